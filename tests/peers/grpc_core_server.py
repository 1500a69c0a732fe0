#!/usr/bin/env python3
"""A grpc-core gRPC server (Python grpcio, asyncio API) for towline's tests.

Serves towline.testkit.v1.Echo and towline.testkit.v1.Log from the repository's protos, loaded
at run time with grpc.protos_and_services (grpcio-tools compiles them in memory: no generated
files), plus grpc.health.v1.Health. Driven by towline::testkit::peer; see tests/peers/README.md
for the command line and the stdin control protocol.

Run it with tests/peers/.venv/bin/python (tests/peers/install.sh creates that venv).
"""

import argparse
import asyncio
import os
import socket
import sys
import threading
import time

import grpc
from grpc import aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

ECHO_SERVICE = "towline.testkit.v1.Echo"
LATENCY_HEADER = "towline-testkit-latency-ms"
DEADLINE_HEADER = "x-deadline-remaining-ms"
PUSHBACK_HEADER = "grpc-retry-pushback-ms"

# One lock for everything written to stdout, so that STOPPED never lands inside an answer.
_stdout_lock = threading.Lock()


def say(line):
    with _stdout_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def parse_args():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--id", default=None, help="default: 127.0.0.1:PORT")
    p.add_argument("--proto-dir", default=os.path.join(here, "..", "..", "proto"))
    p.add_argument("--no-health", action="store_true", help="do not serve grpc.health.v1")
    p.add_argument("--max-concurrent-streams", type=int, default=None)
    p.add_argument("--max-connection-age-ms", type=int, default=None)
    p.add_argument("--max-connection-age-grace-ms", type=int, default=None)
    p.add_argument("--permit-keepalive-ms", type=int, default=None)
    return p.parse_args()


def status_code(text):
    """A grpc.StatusCode from a name (UNAVAILABLE, unavailable) or a number (14)."""
    for code in grpc.StatusCode:
        if text.isdigit() and code.value[0] == int(text):
            return code
        if code.name == text.upper():
            return code
    raise ValueError(f"unknown status code {text!r}")


class State:
    """What the stdin commands change and the handlers read; only touched on the event loop."""

    def __init__(self, server_id):
        self.id = server_id
        self.calls = 0
        self.records = 0
        self.latency_ms = 0
        self.fail_next = 0
        self.fail_code = grpc.StatusCode.UNAVAILABLE
        self.pushback = None

    async def admit(self, context):
        """Counts the call, waits out the latency, then fails it or returns its 1-based number.

        Also returns the deadline left when the handler started, in ms (None: no deadline)."""
        remaining = context.time_remaining()
        self.calls += 1
        number = self.calls
        failure = None
        if self.fail_next > 0:
            self.fail_next -= 1
            failure = (self.fail_code, self.pushback)
        metadata = dict(ascii_metadata(context))
        latency = self.latency_ms
        try:
            latency += int(metadata.get(LATENCY_HEADER, "0"))
        except ValueError:
            pass
        if latency > 0:
            # A call whose deadline passes meanwhile is cancelled by grpc-core, which ends this.
            await asyncio.sleep(latency / 1000)
        if failure is not None:
            code, pushback = failure
            trailers = ()
            if pushback is not None:
                # "a,b" sends the header twice, to test a response with more than one value.
                trailers = tuple((PUSHBACK_HEADER, v) for v in pushback.split(","))
            await context.abort(code, f"grpc-core peer: injected failure on {self.id}", trailers)
        deadline_ms = None if remaining is None else int(remaining * 1000)
        return number, deadline_ms, metadata

    def respond(self, number, deadline_ms, metadata, message, payload):
        headers = dict(metadata)
        if deadline_ms is not None:
            headers[DEADLINE_HEADER] = str(deadline_ms)
        return echo_pb2.EchoResponse(
            message=message,
            payload=payload,
            backend=self.id,
            request_headers=headers,
            call_number=number,
        )


def ascii_metadata(context):
    """The request metadata the handler sees, ASCII entries only (-bin values are bytes)."""
    return [
        (key, value)
        for key, value in (context.invocation_metadata() or ())
        if not key.endswith("-bin") and isinstance(value, str)
    ]


def make_echo(state):
    class Echo(echo_pb2_grpc.EchoServicer):
        async def Unary(self, request, context):
            number, deadline, md = await state.admit(context)
            return state.respond(number, deadline, md, request.message, request.payload)

        async def ServerStream(self, request, context):
            number, deadline, md = await state.admit(context)
            response = state.respond(number, deadline, md, request.message, request.payload)
            for _ in range(max(request.count, 1)):
                if request.interval_ms:
                    await asyncio.sleep(request.interval_ms / 1000)
                yield response

        async def ClientStream(self, request_iterator, context):
            number, deadline, md = await state.admit(context)
            message, payload = "", b""
            async for request in request_iterator:
                message += request.message
                payload += request.payload
            return state.respond(number, deadline, md, message, payload)

    return Echo()


def make_log(state):
    class Log(produce_pb2_grpc.LogServicer):
        async def Produce(self, request, context):
            await state.admit(context)
            results = []
            for record in request.records:
                if not record:
                    results.append(
                        produce_pb2.RecordResult(
                            code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                            message="grpc-core peer: empty record",
                        )
                    )
                else:
                    results.append(produce_pb2.RecordResult(code=0, offset=state.records))
                    state.records += 1
            return produce_pb2.ProduceResponse(results=results)

    return Log()


def server_options(args):
    options = [
        # A restart on the same port must fail loudly while an old process still holds it,
        # not share the port with it (grpc-core sets SO_REUSEPORT by default; SO_REUSEADDR
        # stays on, so TIME_WAIT never blocks a restart).
        ("grpc.so_reuseport", 0),
    ]
    if args.max_concurrent_streams is not None:
        options.append(("grpc.max_concurrent_streams", args.max_concurrent_streams))
    if args.max_connection_age_ms is not None:
        options.append(("grpc.max_connection_age_ms", args.max_connection_age_ms))
    if args.max_connection_age_grace_ms is not None:
        options.append(("grpc.max_connection_age_grace_ms", args.max_connection_age_grace_ms))
    if args.permit_keepalive_ms is not None:
        # Otherwise grpc-core's defaults stand: pings more often than every 5 minutes without
        # data earn strikes, and the third gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
        options += [
            ("grpc.http2.min_recv_ping_interval_without_data_ms", args.permit_keepalive_ms),
            ("grpc.http2.min_ping_interval_without_data_ms", args.permit_keepalive_ms),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
    return options


def listener_closed(port, within_s=2.0):
    """Waits until a connect to our port is refused, so `ok` to `stop` means it is."""
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return True
        time.sleep(0.01)
    return False


class Control:
    """Carries out the stdin commands; each answers one line."""

    def __init__(self, state, server, health, port):
        self.state, self.server, self.health, self.port = state, server, health, port
        self.stopping = False
        # Set once `ok` to `stop` is written, so that STOPPED always comes after it.
        self.stop_answered = asyncio.Event()

    async def run(self, words):
        cmd, rest = words[0], words[1:]
        state = self.state
        if cmd == "health" and len(rest) == 2:
            if self.health is None:
                return "err no health service (--no-health)"
            if rest[1] not in ("SERVING", "NOT_SERVING"):
                return f"err bad status {rest[1]!r}"
            status = health_pb2.HealthCheckResponse.ServingStatus.Value(rest[1])
            # "*" is both services; '""' is the server as a whole, the empty service name.
            services = {"*": ("", ECHO_SERVICE), '""': ("",)}.get(rest[0], (rest[0],))
            for service in services:
                await self.health.set(service, status)
            return "ok"
        if cmd == "latency" and len(rest) == 1:
            state.latency_ms = int(rest[0])
            return "ok"
        if cmd == "fail" and len(rest) in (2, 3):
            state.fail_code = status_code(rest[1])
            state.fail_next = int(rest[0])
            state.pushback = rest[2] if len(rest) == 3 else None
            return "ok"
        if cmd == "clear" and not rest:
            state.latency_ms, state.fail_next, state.pushback = 0, 0, None
            return "ok"
        if cmd == "calls" and not rest:
            return f"ok {state.calls}"
        if cmd == "stop" and len(rest) == 1:
            if self.stopping:
                return "err already stopping"
            self.stopping = True
            grace_s = int(rest[0]) / 1000
            asyncio.get_running_loop().create_task(self.stop(grace_s))
            # server.stop has begun at its first await: listener closing, GOAWAY on the way.
            await asyncio.sleep(0)
            closed = await asyncio.to_thread(listener_closed, self.port)
            return "ok" if closed else "err listener still accepting after 2 s"
        return f"err unknown command {' '.join(words)!r}"

    async def stop(self, grace_s):
        # In-flight calls may finish within the grace; then grpc-core cancels what is left.
        await self.server.stop(grace_s)
        await self.stop_answered.wait()
        say("STOPPED")
        os._exit(0)


def read_stdin(loop, control):
    """The stdin thread: one command at a time, answered in order. EOF exits at once."""
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words == ["exit"]:
            os._exit(0)
        future = asyncio.run_coroutine_threadsafe(control.run(words), loop)
        try:
            answer = future.result()
        except Exception as err:  # a bad number, a bad code name: tell the caller
            answer = f"err {type(err).__name__}: {err}".replace("\n", " ")
        say(answer)
        if words[0] == "stop":
            loop.call_soon_threadsafe(control.stop_answered.set)
    os._exit(0)


async def main(args):
    state = State(args.id)
    server = aio.server(options=server_options(args))
    echo_pb2_grpc.add_EchoServicer_to_server(make_echo(state), server)
    produce_pb2_grpc.add_LogServicer_to_server(make_log(state), server)
    health = None
    if not args.no_health:
        health = grpc_health.aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(ECHO_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    except RuntimeError as err:  # grpc-core logged the reason (address in use...) just before
        raise SystemExit(f"grpc-core peer: cannot listen on 127.0.0.1:{args.port}: {err}")
    if state.id is None:
        state.id = f"127.0.0.1:{port}"
    await server.start()
    say(f"LISTENING {port}")
    control = Control(state, server, health, port)
    loop = asyncio.get_running_loop()
    threading.Thread(target=read_stdin, args=(loop, control), daemon=True).start()
    # Run until a command exits the process: `stop` (after STOPPED), `exit` or EOF. Not
    # server.wait_for_termination(): returning would cancel the `stop` command still answering.
    await asyncio.Event().wait()


if __name__ == "__main__":
    ARGS = parse_args()
    sys.path.insert(0, os.path.abspath(ARGS.proto_dir))
    echo_pb2, echo_pb2_grpc = grpc.protos_and_services("towline/testkit/v1/echo.proto")
    produce_pb2, produce_pb2_grpc = grpc.protos_and_services("towline/testkit/v1/produce.proto")
    asyncio.run(main(ARGS))
