// The AI SDK's openai-compatible provider (what OpenCode uses) driving streamText against a live Minerva: an agent
// loop of two steps, a forced tool call executed by the SDK, then a text answer to the tool's result.
// Run by tests/test_ai_sdk.py with MINERVA_BASE_URL and MINERVA_MODEL set; exits non-zero on any failed check.
import assert from 'node:assert/strict';

import { createOpenAICompatible } from '@ai-sdk/openai-compatible';
import { stepCountIs, streamText, tool } from 'ai';
import { z } from 'zod';

const minerva = createOpenAICompatible({
  name: 'minerva',
  baseURL: process.env.MINERVA_BASE_URL,
  includeUsage: true,
});
const model = minerva(process.env.MINERVA_MODEL);

const executed = [];
const getWeather = tool({
  description: 'Weather in a city',
  inputSchema: z.object({ city: z.string().max(20) }),
  execute: async ({ city }) => {
    executed.push(city);
    return `Sunny, 21 C in ${city}`;
  },
});

const result = streamText({
  model,
  prompt: 'What is the weather in Paris?',
  tools: { get_weather: getWeather },
  temperature: 0,
  maxOutputTokens: 40,
  stopWhen: stepCountIs(2),
  // Step 1 must call the tool (a grammar holds the tiny model to it); step 2 answers the result in words.
  prepareStep: ({ stepNumber }) =>
    stepNumber === 0 ? { toolChoice: { type: 'tool', toolName: 'get_weather' } } : { toolChoice: 'none' },
});

const parts = [];
for await (const part of result.fullStream) {
  if (part.type === 'error') throw part.error;
  parts.push(part);
}
const types = parts.map((p) => p.type);

const call = parts.find((p) => p.type === 'tool-call');
assert.ok(call, `no tool-call part in ${types}`);
assert.equal(call.toolName, 'get_weather');
assert.equal(typeof call.input.city, 'string');
assert.deepEqual(executed, [call.input.city]);

const start = parts.find((p) => p.type === 'tool-input-start');
assert.ok(start && start.toolName === 'get_weather' && start.id === call.toolCallId, 'tool-input-start');
const streamedInput = parts.filter((p) => p.type === 'tool-input-delta').map((p) => p.delta).join('');
assert.deepEqual(JSON.parse(streamedInput), call.input);
assert.ok(types.includes('tool-result'), 'the SDK ran the tool');

const steps = parts.filter((p) => p.type === 'finish-step');
assert.equal(steps.length, 2);
assert.equal(steps[0].finishReason, 'tool-calls');
assert.ok(['stop', 'length'].includes(steps[1].finishReason), steps[1].finishReason);
assert.ok(steps.every((s) => s.usage.inputTokens > 0 && s.usage.outputTokens > 0), 'usage on every step');

const text = parts.filter((p) => p.type === 'text-delta').map((p) => p.text).join('');
assert.ok(text.trim().length > 0, 'step 2 answered in words');
assert.ok(parts.filter((p) => p.type === 'text-delta').length > 1, 'the answer streamed in pieces');

console.log(JSON.stringify({ ok: true, call: call.input, text, types: [...new Set(types)] }));
