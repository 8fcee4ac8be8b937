// The AI SDK's streamText with the shape of OpenCode's requests: three system messages, twenty tools, maxOutputTokens
// 32000 and a long prompt (a file attached to the user's message, as OpenCode inlines an @-mentioned file). It reads
// the answer until PIECES pieces of it (text or a tool call's arguments) have streamed, then stops, as a user
// interrupting the agent would. Run by tests/test_ai_sdk.py with MINERVA_BASE_URL, MINERVA_MODEL, PROMPT_LINES and
// PIECES set; prints one JSON report line and exits non-zero on any failed check.
import assert from 'node:assert/strict';

import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { streamText } from 'ai';

import { tools } from './opencode_tools.mjs';

const sent = [];
const requestIds = [];
const minerva = createOpenAICompatible({
  name: 'minerva',
  baseURL: process.env.MINERVA_BASE_URL,
  includeUsage: true,
  fetch: async (url, init) => {
    sent.push(JSON.parse(init.body)); // what went over the wire, for the report
    const response = await fetch(url, init);
    requestIds.push(response.headers.get('x-request-id'));
    return response;
  },
});

const agent = [
  'You are a coding agent running in the user\'s terminal. You help with software engineering tasks: fixing bugs,',
  'adding features, refactoring, explaining code. Use the tools available to you to read and change the project;',
  'never guess at the contents of a file you can read.',
  '',
  '# Tone',
  'Be concise and direct. Your answers are shown in a terminal with a monospace font and rendered as Markdown.',
  'Answer in fewer than four lines unless the user asks for detail; no preamble, no summary of what you did',
  'unless asked. Do not use emojis.',
  '',
  '# Doing tasks',
  '1. Search the codebase to understand the request (grep, glob, read; in parallel when independent).',
  '2. Plan with the todowrite tool when the task has several steps, and keep the list current.',
  '3. Implement the change, following the conventions of the code around it: its libraries, naming and style.',
  '4. Verify it with the project\'s tests and linters; find their commands in the README or AGENTS.md, never',
  '   assume a test framework.',
  '',
  '# Tool use',
  'Call several independent tools in one answer. Prefer the dedicated tools to bash for reading and searching.',
  'When you reference code, write file_path:line_number so the user can jump to it.',
].join('\n');
const environment = [
  'Here is some useful information about the environment you are running in:',
  '<env>',
  '  Working directory: /home/dev/inventory',
  '  Is directory a git repo: yes',
  '  Platform: linux',
  "  Today's date: Wed Dec 02 2026",
  '</env>',
  '<files>',
  ...['src/', 'src/server/', 'src/server/routes.ts', 'src/server/db.ts', 'src/web/', 'src/web/app.tsx', 'test/',
    'test/routes.test.ts', 'package.json', 'tsconfig.json', 'AGENTS.md'].map((f) => `  ${f}`),
  '</files>',
].join('\n');
const instructions = [
  'Instructions from: /home/dev/inventory/AGENTS.md',
  '# inventory',
  '- Run `npm test` before every commit; `npm run lint` must pass.',
  '- Routes live in src/server/routes.ts, one handler per route; database access only through src/server/db.ts.',
  '- Use 2-space indentation and double quotes in TypeScript.',
].join('\n');

// A long, deterministic source file: PROMPT_LINES route handlers.
const lines = [];
for (let i = 0; i < Number(process.env.PROMPT_LINES); i++) {
  lines.push(
    `export async function getItem${i}(req: Request, res: Response) {`,
    `  const item = await db.items.find({ id: req.params.id, shelf: ${i % 17}, warehouse: "w${i % 5}" });`,
    `  if (!item) return res.status(404).json({ error: "item ${i} not found" });`,
    `  return res.json({ ...item, price: item.cents / 100, restock: item.count < ${(i * 7) % 50} });`,
    '}',
  );
}
const attached = lines.map((line, i) => `${String(i + 1).padStart(5, '0')}| ${line}`).join('\n');

const controller = new AbortController();
const result = streamText({
  model: minerva(process.env.MINERVA_MODEL),
  messages: [
    { role: 'system', content: agent },
    { role: 'system', content: environment },
    { role: 'system', content: instructions },
    {
      role: 'user',
      content: [
        { type: 'text', text: 'Why does GET /items/:id return 404 for items on shelf 3? Look at the routes.' },
        { type: 'text', text: `Called the Read tool with the following input: {"filePath":"src/server/routes.ts"}` },
        { type: 'text', text: `<file>\n${attached}\n</file>` },
      ],
    },
  ],
  allowSystemInMessages: true, // as OpenCode sends them
  tools,
  maxOutputTokens: 32000,
  temperature: 0,
  maxRetries: 0,
  abortSignal: controller.signal,
});

const parts = [];
const isPiece = (p) => p.type === 'text-delta' || p.type === 'tool-input-delta';
for await (const part of result.fullStream) {
  if (part.type === 'error') throw part.error;
  parts.push(part);
  if (parts.filter(isPiece).length >= Number(process.env.PIECES)) {
    controller.abort();
    break;
  }
}
const types = parts.map((p) => p.type);
const text = parts.filter((p) => p.type === 'text-delta').map((p) => p.text).join('');
const call = parts.find((p) => p.type === 'tool-input-start');
const input = parts.filter((p) => p.type === 'tool-input-delta').map((p) => p.delta).join('');
assert.ok(parts.filter(isPiece).length >= Number(process.env.PIECES) || parts.some((p) => p.type === 'finish-step'),
  `the answer ended early: ${types}`);
assert.ok(text.trim() || (call && input), `neither text nor a tool call in ${types}`);
if (call) assert.ok(call.toolName in tools, call.toolName);
const body = sent[0];
console.log(
  JSON.stringify({
    requestId: requestIds[0],
    types: [...new Set(types)],
    text,
    call: call && { name: call.toolName, input },
    sent: {
      systems: body.messages.filter((m) => m.role === 'system').length,
      tools: body.tools.length,
      max_tokens: body.max_tokens,
      tool_choice: body.tool_choice,
      characters: JSON.stringify(body).length,
    },
  }),
);
