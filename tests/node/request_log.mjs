// server-everything's Streamable HTTP app with a request log, for the fuzz verdict.
//
//   PORT=P node request_log.mjs LOG.jsonl
//
// Starts `@modelcontextprotocol/server-everything`'s streamableHttp transport unchanged and
// writes one JSON line per HTTP request when its response starts (so a long SSE stream is on
// record while it is still open), in the format of tests/peers/upstream_server.py's log:
// method, path (as sent, not decoded), query, status, the session header of the request and
// of the response, Authorization. The verdict (tests/peers/fuzzing.py) reads what reached the
// upstream from this file alone, never from the sidecar.
//
// The log sits below Express: `http.createServer` is wrapped before the app module is loaded,
// so every request is seen whatever Express's router makes of it (a 404 of an unknown route
// is logged too). The upstream's live sessions live in a Map private to the app module, so
// they are derived from the log: ids issued to a 2xx, minus those a 2xx DELETE named.
// The request body is not read here: a second reader would take bytes from the SDK's.

import fs from "node:fs";
import http from "node:http";
import { createRequire } from "node:module";
import path from "node:path";
import { pathToFileURL } from "node:url";

const logPath = process.argv[2];
if (!logPath) {
  console.error("usage: node request_log.mjs LOG.jsonl (with PORT set)");
  process.exit(2);
}
const logFd = fs.openSync(logPath, "a");

function first(value) {
  return Array.isArray(value) ? value.join(", ") : (value ?? null);
}

// The headers a writeHead call sets: `writeHead(status[, message][, headers])`, headers as an
// object or a flat [name, value, ...] array; those set earlier with setHeader count too.
function responseHeader(res, args, name) {
  const given = args.find((arg, i) => i > 0 && arg && typeof arg === "object");
  if (Array.isArray(given)) {
    for (let i = 0; i + 1 < given.length; i += 2) {
      if (String(given[i]).toLowerCase() === name) return String(given[i + 1]);
    }
  } else if (given) {
    for (const [key, value] of Object.entries(given)) {
      if (key.toLowerCase() === name) return first(value);
    }
  }
  return first(res.getHeader(name));
}

function record(req, res, args) {
  const url = new URL(req.url, "http://upstream");
  const query = {};
  for (const [key, value] of url.searchParams) (query[key] ??= []).push(value);
  const sessionId = first(req.headers["mcp-session-id"]);
  const line = {
    method: req.method,
    path: url.pathname,
    query,
    session_id: sessionId,
    status: typeof args[0] === "number" ? args[0] : res.statusCode,
    response_session_id: responseHeader(res, args, "mcp-session-id"),
    header_session_id: sessionId,
    authorization: first(req.headers.authorization),
    rpc_methods: [],
  };
  fs.writeSync(logFd, JSON.stringify(line) + "\n");
}

function logged(handler) {
  return (req, res) => {
    const writeHead = res.writeHead;
    let written = false;
    res.writeHead = function (...args) {
      // Express's implicit header write goes through writeHead too; log the first only.
      if (!written) {
        written = true;
        record(req, res, args);
      }
      return writeHead.apply(this, args);
    };
    return handler(req, res);
  };
}

const createServer = http.createServer;
http.createServer = function (...args) {
  const at = args.findIndex((arg) => typeof arg === "function");
  if (at >= 0) args[at] = logged(args[at]);
  return createServer.apply(this, args);
};

// The app module listens on import (PORT from the environment).
const require = createRequire(import.meta.url);
const everything = path.dirname(require.resolve("@modelcontextprotocol/server-everything/package.json"));
await import(pathToFileURL(path.join(everything, "dist", "transports", "streamableHttp.js")).href);
