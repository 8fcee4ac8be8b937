// Model output as HTML: Markdown through marked, then DOMPurify (model output is untrusted: no script, no event
// handler attribute, no javascript: URL survives), then highlight.js on the code blocks.
import { marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.mjs";
import hljs from "./vendor/highlight.core.min.js";
import bash from "./vendor/languages/bash.min.js";
import c from "./vendor/languages/c.min.js";
import cpp from "./vendor/languages/cpp.min.js";
import css from "./vendor/languages/css.min.js";
import diff from "./vendor/languages/diff.min.js";
import go from "./vendor/languages/go.min.js";
import java from "./vendor/languages/java.min.js";
import javascript from "./vendor/languages/javascript.min.js";
import json from "./vendor/languages/json.min.js";
import markdown from "./vendor/languages/markdown.min.js";
import plaintext from "./vendor/languages/plaintext.min.js";
import python from "./vendor/languages/python.min.js";
import rust from "./vendor/languages/rust.min.js";
import shell from "./vendor/languages/shell.min.js";
import sql from "./vendor/languages/sql.min.js";
import typescript from "./vendor/languages/typescript.min.js";
import xml from "./vendor/languages/xml.min.js";
import yaml from "./vendor/languages/yaml.min.js";

const languages = { bash, c, cpp, css, diff, go, java, javascript, json, markdown, plaintext, python, rust, shell,
                    sql, typescript, xml, yaml };
for (const [name, grammar] of Object.entries(languages)) hljs.registerLanguage(name, grammar);

marked.setOptions({ gfm: true, breaks: false });

// Links the model writes open in a new tab and tell the browser nothing about this page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Render `text` (Markdown from a model) into `element`, sanitized, code highlighted. */
export function renderMarkdown(element, text) {
  element.innerHTML = DOMPurify.sanitize(marked.parse(text), { FORBID_TAGS: ["style", "form", "input"] });
  for (const block of element.querySelectorAll("pre code")) {
    const language = [...block.classList].find((c) => c.startsWith("language-"))?.slice(9);
    if (language && hljs.getLanguage(language)) {
      block.innerHTML = hljs.highlight(block.textContent, { language, ignoreIllegals: true }).value;
      block.classList.add("hljs");
    }
  }
}
