// Twenty tools shaped like OpenCode's built-in ones (their names and parameters; the descriptions are ours), as zod
// schemas the AI SDK turns into JSON Schema, the way OpenCode declares them.
import { tool } from 'ai';
import { z } from 'zod';

const filePath = z.string().describe('The absolute path to the file');

export const tools = {
  bash: tool({
    description: [
      'Runs a shell command in a persistent session, with an optional timeout, and returns its output.',
      'Use it for git, package managers, builds and tests; do not use it to read, search or edit files, since the',
      'read, grep, glob and edit tools do that better. Quote paths that contain spaces. Output longer than 30000',
      'characters is cut. Prefer running several independent commands in parallel calls over chaining them.',
      'Never run interactive commands (editors, pagers, prompts): they wait for input that will not come.',
    ].join(' '),
    inputSchema: z.object({
      command: z.string().describe('The command to execute'),
      timeout: z.number().describe('Optional timeout in milliseconds').optional(),
      workdir: z.string().describe('The working directory to run the command in; defaults to the project root').optional(),
      description: z.string().describe('A clear, concise description of what this command does in 5-10 words'),
    }),
  }),
  read: tool({
    description: [
      'Reads a file from the local filesystem and returns its lines numbered from 1. By default it reads up to',
      '2000 lines from the start; offset and limit read a window of a long file. Lines longer than 2000',
      'characters are cut. It can read images and PDFs as attachments. Reading a file that does not exist is an',
      'error that suggests similar paths. Read a file before you edit it.',
    ].join(' '),
    inputSchema: z.object({
      filePath: z.string().describe('The path to the file to read'),
      offset: z.coerce.number().describe('The line number to start reading from (0-based)').optional(),
      limit: z.coerce.number().describe('The number of lines to read (defaults to 2000)').optional(),
    }),
  }),
  write: tool({
    description: [
      'Writes a file to the local filesystem, replacing it if it exists. Read an existing file first: writing',
      'over a file you have not read fails. Prefer editing existing files; never create documentation files',
      'unless asked to.',
    ].join(' '),
    inputSchema: z.object({
      content: z.string().describe('The content to write to the file'),
      filePath: z.string().describe('The absolute path to the file to write (must be absolute, not relative)'),
    }),
  }),
  edit: tool({
    description: [
      'Replaces exact text in a file. oldString must match the file exactly, indentation included, and must be',
      'unique in the file unless replaceAll is set; otherwise the edit fails. Keep oldString as short as makes',
      'it unique. Use replaceAll to rename a variable throughout a file.',
    ].join(' '),
    inputSchema: z.object({
      filePath,
      oldString: z.string().describe('The text to replace'),
      newString: z.string().describe('The text to replace it with (must be different from oldString)'),
      replaceAll: z.boolean().describe('Replace all occurrences of oldString (default false)').optional(),
    }),
  }),
  multiedit: tool({
    description: 'Several edits to one file, applied in order, all or none. Each edit works as the edit tool does.',
    inputSchema: z.object({
      filePath,
      edits: z
        .array(
          z.object({
            filePath,
            oldString: z.string().describe('The text to replace'),
            newString: z.string().describe('The text to replace it with'),
            replaceAll: z.boolean().describe('Replace all occurrences of oldString (default false)').optional(),
          }),
        )
        .describe('Array of edit operations to perform sequentially on the file'),
    }),
  }),
  patch: tool({
    description: 'Applies a patch in the unified diff format to one or more files, adding, changing or deleting them.',
    inputSchema: z.object({ patchText: z.string().describe('The full patch text that describes all changes') }),
  }),
  glob: tool({
    description: [
      'Finds files whose paths match a glob pattern such as "**/*.js" or "src/**/*.ts", newest first. Works',
      'on codebases of any size. For open-ended searches that need several rounds, use the task tool instead.',
    ].join(' '),
    inputSchema: z.object({
      pattern: z.string().describe('The glob pattern to match files against'),
      path: z
        .string()
        .describe('The directory to search in; omit it for the current directory (do not pass "undefined" or "null")')
        .optional(),
    }),
  }),
  grep: tool({
    description: [
      'Searches file contents with a regular expression (full regex syntax, e.g. "log.*Error", "function\\s+\\w+")',
      'and returns the paths and line numbers of matching lines, newest files first. Filter files with include',
      '(e.g. "*.js", "*.{ts,tsx}"). To count matches, use bash with rg directly.',
    ].join(' '),
    inputSchema: z.object({
      pattern: z.string().describe('The regex pattern to search for in file contents'),
      path: z.string().describe('The directory to search in; defaults to the current working directory').optional(),
      include: z.string().describe('File pattern to include in the search (e.g. "*.js", "*.{ts,tsx}")').optional(),
    }),
  }),
  list: tool({
    description: 'Lists files and directories in a path as a tree, skipping common build and dependency folders.',
    inputSchema: z.object({
      path: z.string().describe('The absolute path to the directory to list (must be absolute, not relative)').optional(),
      ignore: z.array(z.string()).describe('List of glob patterns to ignore').optional(),
    }),
  }),
  todowrite: tool({
    description: [
      'Creates and updates the structured task list of this session, to track progress on multi-step work and',
      'show it to the user. Use it for tasks of three or more steps or when the user gives several tasks; keep',
      'exactly one task in_progress at a time and mark each completed as soon as it is done.',
    ].join(' '),
    inputSchema: z.object({
      todos: z
        .array(
          z.object({
            content: z.string().describe('Brief description of the task'),
            status: z.enum(['pending', 'in_progress', 'completed', 'cancelled']).describe('Current status of the task'),
            priority: z.enum(['high', 'medium', 'low']).describe('Priority level of the task'),
            id: z.string().describe('Unique identifier for the todo item'),
          }),
        )
        .describe('The updated todo list'),
    }),
  }),
  todoread: tool({
    description: 'Reads the current task list of this session. Takes no parameters.',
    inputSchema: z.object({}),
  }),
  task: tool({
    description: [
      'Starts a subagent that works on a task on its own and reports back once. Use it for open-ended searches',
      'and multi-step research; give it a detailed prompt and say whether it should write code or only research.',
      'Available agent types: general (researches and runs multi-step tasks), explore (fast codebase search).',
    ].join(' '),
    inputSchema: z.object({
      description: z.string().describe('A short (3-5 words) description of the task'),
      prompt: z.string().describe('The task for the agent to perform'),
      subagent_type: z.string().describe('The type of specialized agent to use for this task'),
      task_id: z.string().describe('Continue an earlier task session instead of starting a new one').optional(),
    }),
  }),
  webfetch: tool({
    description: 'Fetches a URL and returns its content as text, markdown or HTML. HTTP is upgraded to HTTPS.',
    inputSchema: z.object({
      url: z.string().describe('The URL to fetch content from'),
      format: z.enum(['text', 'markdown', 'html']).describe('The format to return the content in'),
      timeout: z.number().describe('Optional timeout in seconds (max 120)').optional(),
    }),
  }),
  websearch: tool({
    description: 'Searches the web and returns the content of the most relevant pages, for facts past your training.',
    inputSchema: z.object({
      query: z.string().describe('Websearch query'),
      numResults: z.number().describe('Number of search results to return (default: 8)').optional(),
      livecrawl: z.enum(['fallback', 'preferred']).describe('Live crawl mode').optional(),
      type: z.enum(['auto', 'fast', 'deep']).describe('Search type').optional(),
    }),
  }),
  codesearch: tool({
    description: 'Searches public code and documentation for APIs, libraries and SDKs, returning relevant snippets.',
    inputSchema: z.object({
      query: z.string().describe('Search query to find relevant context for APIs, libraries and SDKs'),
      tokensNum: z.number().describe('Number of tokens to return (1000-50000, default 5000)').optional(),
    }),
  }),
  skill: tool({
    description: 'Loads a skill (a folder of instructions and scripts for one kind of task) into the conversation.',
    inputSchema: z.object({ name: z.string().describe('The skill identifier from available_skills') }),
  }),
  question: tool({
    description: 'Asks the user one or more multiple-choice questions when their preferences decide the next step.',
    inputSchema: z.object({
      questions: z
        .array(
          z.object({
            question: z.string().describe('Complete question'),
            header: z.string().describe('Very short label (max 30 chars)'),
            options: z
              .array(z.object({ label: z.string().describe('Display text'), description: z.string().describe('Explanation of choice') }))
              .describe('Available choices'),
            multiple: z.boolean().describe('Allow selecting multiple choices').optional(),
          }),
        )
        .describe('Questions to ask'),
    }),
  }),
  lsp: tool({
    description: 'Asks the language server about a position in a file: definition, references, hover or symbols.',
    inputSchema: z.object({
      operation: z.enum(['goToDefinition', 'findReferences', 'hover', 'documentSymbol', 'workspaceSymbol']),
      filePath,
      line: z.number().describe('The line number (1-based)'),
      character: z.number().describe('The character offset (1-based)'),
    }),
  }),
  batch: tool({
    description: 'Runs up to 25 independent tool calls at once and returns all their results.',
    inputSchema: z.object({
      tool_calls: z
        .array(z.object({ tool: z.string().describe('The name of the tool to execute'), parameters: z.object({}).passthrough() }))
        .describe('Array of tool calls to execute in parallel'),
    }),
  }),
  invalid: tool({
    description: 'Do not use.',
    inputSchema: z.object({ tool: z.string(), error: z.string() }),
  }),
};
