#!/usr/bin/env python3
"""Follow a waltap persisted stream over Server-Sent Events, from any Python 3.8+ service,
with nothing but the standard library.

Each change is handled, then its position is saved to a file. After a restart (or a
dropped connection) the client reconnects with `Last-Event-ID` set to the saved position:
the server acknowledges everything up to it and resumes right after, so no change is lost
and none handled before comes again (a crash between handling and saving gives that one
change again: make the handler idempotent, e.g. by the event's `id`).

    WALTAP_URL=http://127.0.0.1:7373 WALTAP_KEY=orders-reader-7f3a9c \\
        python3 examples/follow_stream.py billing --state billing.pos

Options: --state FILE (default <stream>.pos), --limit N (exit after N changes; for tests).
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def load_position(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def save_position(path, position):
    # Write then rename, so a crash never leaves a half-written position.
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(position)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def frames(response):
    """Yields (event, id, data) for each SSE frame; comment lines (keepalives) are skipped."""
    event, ident, data = "message", None, []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, ident, "\n".join(data)
            event, ident, data = "message", None, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "id":
                ident = value
            elif field == "data":
                data.append(value)


def handle(change):
    """Your code: here, one JSON line per change on stdout."""
    print(json.dumps(change), flush=True)


def follow(base, key, stream, state, limit):
    handled = 0
    backoff = 0.5
    while True:
        request = urllib.request.Request(
            f"{base}/v1/streams/{stream}",
            headers={"Accept": "text/event-stream", "Authorization": f"Bearer {key}"},
        )
        position = load_position(state)
        if position:
            request.add_header("Last-Event-ID", position)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                backoff = 0.5
                for event, ident, data in frames(response):
                    if event == "change":
                        handle(json.loads(data))
                        save_position(state, ident)
                        handled += 1
                        if limit is not None and handled >= limit:
                            return
                    elif event == "error":
                        error = json.loads(data)["error"]
                        if error["code"] == "stale_cursor":
                            sys.exit(f"stale cursor: {error['message']}")
                        print(f"stream error: {error}", file=sys.stderr)
                        break
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}").get("error", {})
            if e.code in (401, 403, 404, 410):
                sys.exit(f"{e.code} {body.get('code')}: {body.get('message')}")
            # 409 stream_busy (the previous connection's lease), 429, 503: try again.
            print(f"{e.code} {body.get('code')}; retrying", file=sys.stderr)
        except (urllib.error.URLError, OSError) as e:
            print(f"connection: {e}; retrying", file=sys.stderr)
        time.sleep(backoff)
        backoff = min(backoff * 2, 30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("stream")
    parser.add_argument("--state")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()
    base = os.environ.get("WALTAP_URL", "http://127.0.0.1:7373").rstrip("/")
    key = os.environ.get("WALTAP_KEY")
    if not key:
        sys.exit("set WALTAP_KEY to an API key with stream rights")
    try:
        follow(base, key, args.stream, args.state or f"{args.stream}.pos", args.limit)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
