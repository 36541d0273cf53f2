#!/usr/bin/env node
// TypeScript-SDK client driver for mcp-sidecar interop tests.
//
// Usage:  node client.mjs '<json script>'   |   node client.mjs script.json   |   node client.mjs < script.json
//
// Script:
//   {
//     "url": "http://127.0.0.1:PORT/mcp",          // or .../sse for the legacy transport
//     "transport": "streamable-http" | "sse",      // default "streamable-http"
//     "headers": {"Authorization": "Bearer x"},    // optional, sent on every HTTP request
//     "clientInfo": {"name": "...", "version": "..."},  // optional
//     "roots": [{"uri": "file:///tmp", "name": "tmp"}], // optional: declare the roots capability
//                                                        //   and answer the server's roots/list
//     "timeoutMs": 30000,                          // optional per-request timeout (SDK default 60 s)
//     "steps": [
//       {"op": "connect"},                         // new Client + transport, initialize
//       {"op": "connect", "sessionId": "..."},     // streamable only: adopt an existing session
//                                                  //   id; the SDK then skips initialize
//       {"op": "listTools"},
//       {"op": "callTool", "name": "echo", "args": {"message": "hi"}, "progress": true},
//       {"op": "ping"},
//       {"op": "request", "method": "resources/list", "params": {}},
//       {"op": "sleep", "ms": 500},
//       {"op": "terminateSession"},                // streamable only: HTTP DELETE of the session
//       {"op": "close"},                           // client.close(): aborts streams, NO DELETE
//       {"op": "reconnect"}                        // close the current client (no DELETE), then
//                                                  //   a brand-new Client + transport + initialize
//     ]
//   }
// Any step may carry "timeoutMs" to override the script-wide request timeout.
//
// Output (stdout, one JSON object per line):
//   {"step":i,"op":...,"ok":true,"result":...,"ms":...}
//   {"step":i,"op":...,"ok":false,"error":"...","status":<HTTP status or null>,"code":<JSON-RPC code or null>,"ms":...}
//   {"event":"session","step":i,"id":<session id>,"transport":...}          after each connect
//   {"event":"progress","step":i,"progress":n,"total":n,"message":...}     progress notifications
//   {"event":"error","message":...,"status":...}                          transport errors reported
//                                                                          outside a step (e.g. the
//                                                                          standalone GET stream)
//   {"event":"endpoint","id":...,"url":...}                               legacy SSE only: the
//                                                                          EventSource reconnected on
//                                                                          its own and the server
//                                                                          announced a NEW endpoint
//   {"event":"roots_list","step":i}                                       server asked for roots
//   {"event":"done","steps":n}                                            last line
// The driver keeps going after a failed step and exits 0 once the script has run
// (exit 2 only when the script itself cannot be read).
//
// Behaviour of @modelcontextprotocol/sdk 1.32.x worth knowing (checked in its source):
// * client.close() only aborts the transport's fetches/streams; it never sends DELETE.
//   StreamableHTTPClientTransport.terminateSession() sends the DELETE (405 counts as success).
// * On a 404 the Streamable HTTP transport throws StreamableHTTPError(404) and keeps the old
//   session id: neither the transport nor Client re-initializes on its own. A caller must build
//   a new transport and Client ("reconnect").
// * The legacy SSEClientTransport uses the `eventsource` package, which reconnects a dropped
//   stream after 3 s (but not after a non-200 answer); the new `endpoint` event silently
//   replaces the POST URL, i.e. the client lands on a new, never-initialized session.

import fs from "node:fs";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport, SseError } from "@modelcontextprotocol/sdk/client/sse.js";
import {
  StreamableHTTPClientTransport,
  StreamableHTTPError,
} from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { ListRootsRequestSchema, McpError, ResultSchema } from "@modelcontextprotocol/sdk/types.js";

function emit(obj) {
  // writeSync: every line is on stdout before process.exit(), whatever stdout is.
  fs.writeSync(1, `${JSON.stringify(obj)}\n`);
}

// Errors already reported as a failed step, so client.onerror does not report them twice.
const reportedErrors = new WeakSet();

function describeError(err) {
  let status = null;
  let code = null;
  if (err instanceof StreamableHTTPError || err instanceof SseError) {
    // StreamableHTTPError.code / SseError.code carry the HTTP status (-1: unexpected content type).
    status = typeof err.code === "number" ? err.code : null;
  } else if (err instanceof McpError) {
    code = err.code; // JSON-RPC error code (e.g. -32001 RequestTimeout, -32000 ConnectionClosed)
  }
  const message = err instanceof Error ? err.message : String(err);
  if (status === null) {
    // SSEClientTransport POST failures are plain Errors: "Error POSTing to endpoint (HTTP 404): ..."
    const m = /\(HTTP (\d{3})\)/.exec(message);
    if (m) status = Number(m[1]);
  }
  return { error: message, status, code };
}

async function readScript() {
  const arg = process.argv[2];
  let text;
  if (arg === undefined || arg === "-") {
    const chunks = [];
    for await (const chunk of process.stdin) chunks.push(chunk);
    text = Buffer.concat(chunks).toString("utf8");
  } else if (arg.trimStart().startsWith("{")) {
    text = arg;
  } else {
    text = fs.readFileSync(arg, "utf8");
  }
  const script = JSON.parse(text);
  if (typeof script.url !== "string") throw new Error('script needs a "url"');
  if (!Array.isArray(script.steps)) throw new Error('script needs a "steps" array');
  return script;
}

function sseSessionId(endpoint) {
  if (!endpoint) return null;
  const url = new URL(String(endpoint));
  return url.searchParams.get("sessionId") ?? url.searchParams.get("session_id");
}

class Driver {
  constructor(script) {
    this.script = script;
    this.kind = script.transport ?? "streamable-http";
    if (this.kind !== "streamable-http" && this.kind !== "sse") {
      throw new Error(`unknown transport ${JSON.stringify(this.kind)}`);
    }
    this.url = new URL(script.url);
    this.timeoutMs = script.timeoutMs ?? 30000;
    this.client = null;
    this.transport = null;
    this.step = null; // index of the step running now, for events
  }

  sessionId() {
    if (!this.transport) return null;
    if (this.kind === "sse") return sseSessionId(this.transport._endpoint);
    return this.transport.sessionId ?? null;
  }

  requestOptions(stepSpec, extra = {}) {
    return { timeout: stepSpec.timeoutMs ?? this.timeoutMs, ...extra };
  }

  async connect(stepSpec) {
    const requestInit = this.script.headers ? { headers: this.script.headers } : undefined;
    let transport;
    if (this.kind === "sse") {
      if (stepSpec.sessionId) throw new Error("sessionId adoption is for streamable-http only");
      transport = new SSEClientTransport(this.url, { requestInit });
    } else {
      transport = new StreamableHTTPClientTransport(this.url, {
        requestInit,
        sessionId: stepSpec.sessionId,
      });
    }
    const capabilities = {};
    if (Array.isArray(this.script.roots)) capabilities.roots = { listChanged: false };
    const client = new Client(
      this.script.clientInfo ?? { name: "mcp-sidecar-node-peer", version: "0.0.0" },
      { capabilities },
    );
    if (capabilities.roots) {
      client.setRequestHandler(ListRootsRequestSchema, async () => {
        emit({ event: "roots_list", step: this.step });
        return { roots: this.script.roots };
      });
    }
    client.onerror = (err) => {
      // The transport reports every failure here, also those a step is about to throw.
      // Report only the others (standalone GET stream etc.): wait until the step had its turn.
      if (err?.name === "AbortError") return;
      const step = this.step;
      setTimeout(() => {
        if (this.client !== client || (typeof err === "object" && reportedErrors.has(err))) return;
        emit({ event: "error", step, ...describeError(err) });
      }, 0);
    };
    this.client = client;
    this.transport = transport;
    await client.connect(transport, this.requestOptions(stepSpec));
    if (this.kind === "sse" && transport._eventSource) {
      // The first endpoint event resolved connect(); later ones mean the EventSource
      // reconnected by itself and the server created a new session.
      transport._eventSource.addEventListener("endpoint", (event) => {
        const url = new URL(event.data, this.url).href;
        emit({ event: "endpoint", step: this.step, id: sseSessionId(url), url });
      });
    }
    const id = this.sessionId();
    emit({ event: "session", step: this.step, id, transport: this.kind });
    return {
      sessionId: id,
      protocolVersion: client.getNegotiatedProtocolVersion?.() ?? transport.protocolVersion ?? null,
      serverInfo: client.getServerVersion() ?? null,
    };
  }

  async closeCurrent() {
    const client = this.client;
    const id = this.sessionId();
    this.client = null;
    this.transport = null;
    if (client) await client.close();
    return { sessionId: id };
  }

  requireClient() {
    if (!this.client) throw new Error("not connected");
    return this.client;
  }

  async run(stepSpec) {
    switch (stepSpec.op) {
      case "connect":
        if (this.client) await this.closeCurrent().catch(() => {});
        return this.connect(stepSpec);
      case "reconnect": {
        const previous = this.sessionId();
        if (this.client) await this.closeCurrent().catch(() => {});
        const result = await this.connect(stepSpec);
        return { ...result, previousSessionId: previous };
      }
      case "listTools": {
        const res = await this.requireClient().listTools(undefined, this.requestOptions(stepSpec));
        return { tools: res.tools.map((t) => t.name) };
      }
      case "callTool": {
        const extra = {};
        if (stepSpec.progress) {
          const step = this.step;
          extra.onprogress = (p) => emit({ event: "progress", step, ...p });
          extra.resetTimeoutOnProgress = true;
        }
        return this.requireClient().callTool(
          { name: stepSpec.name, arguments: stepSpec.args ?? {} },
          undefined,
          this.requestOptions(stepSpec, extra),
        );
      }
      case "ping":
        return this.requireClient().ping(this.requestOptions(stepSpec));
      case "request":
        return this.requireClient().request(
          { method: stepSpec.method, params: stepSpec.params },
          ResultSchema,
          this.requestOptions(stepSpec),
        );
      case "sleep":
        await new Promise((resolve) => setTimeout(resolve, Number(stepSpec.ms ?? 0)));
        return { sessionId: this.sessionId() };
      case "terminateSession": {
        this.requireClient();
        if (this.kind !== "streamable-http") throw new Error("terminateSession: streamable-http only");
        const id = this.sessionId();
        await this.transport.terminateSession();
        return { sessionId: id };
      }
      case "close":
        return this.closeCurrent();
      default:
        throw new Error(`unknown op ${JSON.stringify(stepSpec.op)}`);
    }
  }
}

async function main() {
  let script;
  let driver;
  try {
    script = await readScript();
    driver = new Driver(script);
  } catch (err) {
    emit({ ok: false, fatal: true, error: err instanceof Error ? err.message : String(err) });
    process.exit(2);
  }
  process.on("unhandledRejection", (err) => {
    emit({ event: "error", step: driver.step, unhandled: true, ...describeError(err) });
  });
  for (let i = 0; i < script.steps.length; i++) {
    const stepSpec = script.steps[i] ?? {};
    driver.step = i;
    const started = performance.now();
    const ms = () => Math.round(performance.now() - started);
    try {
      const result = await driver.run(stepSpec);
      emit({ step: i, op: stepSpec.op, ok: true, result: result ?? null, ms: ms() });
    } catch (err) {
      if (typeof err === "object" && err !== null) reportedErrors.add(err);
      emit({ step: i, op: stepSpec.op, ok: false, ...describeError(err), ms: ms() });
    }
  }
  driver.step = null;
  await driver.closeCurrent().catch(() => {});
  emit({ event: "done", steps: script.steps.length });
  process.exit(0);
}

await main();
