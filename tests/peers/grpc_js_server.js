#!/usr/bin/env node
// A grpc-js gRPC server (Node @grpc/grpc-js) for towline's tests.
//
// Serves towline.testkit.v1.Echo and towline.testkit.v1.Log from the repository's protos, loaded
// at run time with @grpc/proto-loader, plus grpc.health.v1.Health from grpc-health-check. Driven
// by towline::testkit::peer; see tests/peers/README.md for the command line and the stdin control
// protocol. Needs tests/peers/node_modules (tests/peers/install.sh runs `npm ci` there).
'use strict';

const net = require('net');
const path = require('path');
const readline = require('readline');
const { parseArgs } = require('util');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { HealthImplementation } = require('grpc-health-check');

const ECHO_SERVICE = 'towline.testkit.v1.Echo';
const LATENCY_HEADER = 'towline-testkit-latency-ms';
const DEADLINE_HEADER = 'x-deadline-remaining-ms';
const PUSHBACK_HEADER = 'grpc-retry-pushback-ms';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    id: { type: 'string' },
    'proto-dir': { type: 'string', default: path.join(__dirname, '..', '..', 'proto') },
    'no-health': { type: 'boolean', default: false },
    'max-concurrent-streams': { type: 'string' },
    'max-connection-age-ms': { type: 'string' },
    'max-connection-age-grace-ms': { type: 'string' },
    'permit-keepalive-ms': { type: 'string' },
  },
});

// Both files in one package definition; keepCase keeps `interval_ms`, longs as strings keep
// uint64 exact.
const pkg = grpc.loadPackageDefinition(
  protoLoader.loadSync(['towline/testkit/v1/echo.proto', 'towline/testkit/v1/produce.proto'], {
    includeDirs: [args['proto-dir']],
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
  }),
).towline.testkit.v1;

function say(line) {
  // Writes to a pipe are synchronous in Node on Linux, so a following process.exit loses nothing.
  process.stdout.write(line + '\n');
}

function statusCode(text) {
  if (/^\d+$/.test(text) && Object.values(grpc.status).includes(Number(text))) {
    return Number(text);
  }
  const code = grpc.status[text.toUpperCase()];
  if (code === undefined) throw new Error(`unknown status code ${JSON.stringify(text)}`);
  return code;
}

function nonNegativeInt(text) {
  if (!/^\d+$/.test(text)) throw new Error(`not a number: ${JSON.stringify(text)}`);
  return Number(text);
}

// What the stdin commands change and the handlers read.
const state = {
  id: args.id,
  calls: 0,
  records: 0,
  latencyMs: 0,
  failNext: 0,
  failCode: grpc.status.UNAVAILABLE,
  pushback: null,
};

// The request metadata the handler sees, ASCII entries only (-bin values are Buffers).
function asciiMetadata(call) {
  const headers = {};
  for (const [key, value] of Object.entries(call.metadata.getMap())) {
    if (!key.endsWith('-bin') && typeof value === 'string') headers[key] = value;
  }
  return headers;
}

// Counts the call, waits out the latency, then calls back with an error status or with
// { number, headers } (headers including DEADLINE_HEADER when the call has a deadline).
function admit(call, done) {
  // grpc-js gives the deadline as ms since the epoch (Infinity without one), or as a Date.
  const deadline = Number(call.getDeadline());
  const headers = asciiMetadata(call);
  if (Number.isFinite(deadline)) {
    headers[DEADLINE_HEADER] = String(Math.max(0, deadline - Date.now()));
  }
  state.calls += 1;
  const number = state.calls;
  let failure = null;
  if (state.failNext > 0) {
    state.failNext -= 1;
    failure = { code: state.failCode, pushback: state.pushback };
  }
  const latency = state.latencyMs + (parseInt(headers[LATENCY_HEADER], 10) || 0);
  const answer = () => {
    if (failure === null) return done(null, { number, headers });
    const metadata = new grpc.Metadata();
    if (failure.pushback !== null) {
      // "a,b" sends the header twice, to test a response with more than one value.
      for (const value of failure.pushback.split(',')) metadata.add(PUSHBACK_HEADER, value);
    }
    done({ code: failure.code, details: `grpc-js peer: injected failure on ${state.id}`, metadata });
  };
  // A call whose deadline passes meanwhile is ended by grpc-js; the late answer is dropped.
  if (latency > 0) setTimeout(answer, latency);
  else answer();
}

function respond({ number, headers }, message, payload) {
  return {
    message,
    payload,
    backend: state.id,
    request_headers: headers,
    call_number: String(number),
  };
}

const echo = {
  Unary(call, callback) {
    admit(call, (err, admitted) => {
      if (err) return callback(err);
      callback(null, respond(admitted, call.request.message, call.request.payload));
    });
  },
  ServerStream(call) {
    admit(call, (err, admitted) => {
      if (err) return call.emit('error', err);
      const response = respond(admitted, call.request.message, call.request.payload);
      let left = Math.max(call.request.count, 1);
      const next = () => {
        if (call.cancelled) return;
        call.write(response);
        left -= 1;
        if (left === 0) call.end();
        else setTimeout(next, call.request.interval_ms);
      };
      setTimeout(next, call.request.interval_ms);
    });
  },
  ClientStream(call, callback) {
    admit(call, (err, admitted) => {
      if (err) return callback(err);
      let message = '';
      const payloads = [];
      call.on('data', (request) => {
        message += request.message;
        payloads.push(request.payload);
      });
      call.on('end', () => callback(null, respond(admitted, message, Buffer.concat(payloads))));
    });
  },
};

const log = {
  Produce(call, callback) {
    admit(call, (err) => {
      if (err) return callback(err);
      const results = call.request.records.map((record) => {
        if (record.length === 0) {
          return {
            code: grpc.status.INVALID_ARGUMENT,
            message: 'grpc-js peer: empty record',
            offset: '0',
          };
        }
        state.records += 1;
        return { code: 0, message: '', offset: String(state.records - 1) };
      });
      callback(null, { results });
    });
  },
};

function serverOptions() {
  const options = {};
  const int = (name) => (args[name] === undefined ? undefined : nonNegativeInt(args[name]));
  if (int('max-concurrent-streams') !== undefined) {
    options['grpc.max_concurrent_streams'] = int('max-concurrent-streams');
  }
  if (int('max-connection-age-ms') !== undefined) {
    options['grpc.max_connection_age_ms'] = int('max-connection-age-ms');
  }
  if (int('max-connection-age-grace-ms') !== undefined) {
    options['grpc.max_connection_age_grace_ms'] = int('max-connection-age-grace-ms');
  }
  if (int('permit-keepalive-ms') !== undefined) {
    // grpc-js enforces no ping strikes at all; these are set for symmetry with grpc-core.
    options['grpc.http2.min_ping_interval_without_data_ms'] = int('permit-keepalive-ms');
    options['grpc.keepalive_permit_without_calls'] = 1;
  }
  return options;
}

// Resolves once a connect to our port is refused, so `ok` to `stop` means it is (false after 2 s).
async function listenerClosed(port) {
  const end = Date.now() + 2000;
  while (Date.now() < end) {
    const refused = await new Promise((resolve) => {
      const socket = net.connect({ host: '127.0.0.1', port });
      socket.once('connect', () => {
        socket.destroy();
        resolve(false);
      });
      socket.once('error', () => resolve(true));
    });
    if (refused) return true;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return false;
}

const server = new grpc.Server(serverOptions());
server.addService(pkg.Echo.service, echo);
server.addService(pkg.Log.service, log);
let health = null;
if (!args['no-health']) {
  health = new HealthImplementation({ '': 'SERVING', [ECHO_SERVICE]: 'SERVING' });
  health.addToServer(server);
}

let stopping = false;
// Resolved once `ok` to `stop` is written, so that STOPPED always comes after it.
let stopAnswered;
const stopAnsweredPromise = new Promise((resolve) => {
  stopAnswered = resolve;
});

function stop(graceMs) {
  const finished = () => {
    stopAnsweredPromise.then(() => {
      say('STOPPED');
      process.exit(0);
    });
  };
  // Closes the listener and sends GOAWAY on every connection; calls in flight run on.
  server.tryShutdown(finished);
  // After the grace, cut whatever is still running (tryShutdown then calls back too).
  setTimeout(() => {
    server.forceShutdown();
    setTimeout(finished, 1000);
  }, graceMs);
}

// Carries out one stdin command; resolves to its one-line answer.
async function run(words, port) {
  const [cmd, ...rest] = words;
  if (cmd === 'health' && rest.length === 2) {
    if (health === null) return 'err no health service (--no-health)';
    if (rest[1] !== 'SERVING' && rest[1] !== 'NOT_SERVING') return `err bad status ${rest[1]}`;
    // "*" is both services; '""' is the server as a whole, the empty service name.
    const services = { '*': ['', ECHO_SERVICE], '""': [''] }[rest[0]] ?? [rest[0]];
    for (const service of services) {
      health.setStatus(service, rest[1]);
    }
    return 'ok';
  }
  if (cmd === 'latency' && rest.length === 1) {
    state.latencyMs = nonNegativeInt(rest[0]);
    return 'ok';
  }
  if (cmd === 'fail' && (rest.length === 2 || rest.length === 3)) {
    const code = statusCode(rest[1]);
    state.failNext = nonNegativeInt(rest[0]);
    state.failCode = code;
    state.pushback = rest.length === 3 ? rest[2] : null;
    return 'ok';
  }
  if (cmd === 'clear' && rest.length === 0) {
    state.latencyMs = 0;
    state.failNext = 0;
    state.pushback = null;
    return 'ok';
  }
  if (cmd === 'calls' && rest.length === 0) return `ok ${state.calls}`;
  if (cmd === 'stop' && rest.length === 1) {
    if (stopping) return 'err already stopping';
    const graceMs = nonNegativeInt(rest[0]);
    stopping = true;
    stop(graceMs);
    return (await listenerClosed(port)) ? 'ok' : 'err listener still accepting after 2 s';
  }
  return `err unknown command ${JSON.stringify(words.join(' '))}`;
}

server.bindAsync(
  `127.0.0.1:${args.port}`,
  grpc.ServerCredentials.createInsecure(),
  (err, port) => {
    if (err) {
      process.stderr.write(`grpc-js peer: cannot listen on 127.0.0.1:${args.port}: ${err.message}\n`);
      process.exit(1);
    }
    if (state.id === undefined) state.id = `127.0.0.1:${port}`;
    say(`LISTENING ${port}`);
    // One command at a time, answered in order; EOF (the test is gone) exits at once.
    const lines = readline.createInterface({ input: process.stdin });
    let queue = Promise.resolve();
    lines.on('line', (line) => {
      const words = line.trim().split(/\s+/).filter((w) => w.length > 0);
      if (words.length === 0) return;
      if (words.length === 1 && words[0] === 'exit') process.exit(0);
      queue = queue.then(async () => {
        try {
          say(await run(words, port));
        } catch (e) {
          say(`err ${e.message}`.replace(/\n/g, ' '));
        }
        if (words[0] === 'stop') stopAnswered();
      });
    });
    lines.on('close', () => process.exit(0));
  },
);
