// Runs against a real `waltap serve` started by the Rust test `server::clients` (cargo test),
// which sets WALTAP_URL (through a proxy it can cut), the keys, and WALTAP_CONTROL.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { once } from "node:events";
import { setTimeout as delay } from "node:timers/promises";

import {
  Waltap,
  StaleCursorError,
  StreamBusyError,
  TokenExpiredError,
  UnauthorizedError,
  LaggedError,
  WaltapError,
} from "../src/index.js";

const url = process.env.WALTAP_URL;
const control = process.env.WALTAP_CONTROL;
if (!url || !control) {
  throw new Error("run through `cargo test --test main -- server::clients` (WALTAP_URL and WALTAP_CONTROL unset)");
}
const admin = new Waltap({ url, key: process.env.WALTAP_ADMIN_KEY, backoff: { initialMs: 50, maxMs: 500 } });

async function call(path, body) {
  const r = await fetch(control + path, {
    method: "POST",
    body: typeof body === "string" ? body : JSON.stringify(body ?? {}),
    headers: { "Content-Type": "application/json" },
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`control ${path}: ${r.status} ${text}`);
  return text;
}
const sql = (text) => call("/sql", text);

/** Inserts orders `ids`, one transaction each. */
async function insertOrders(ids) {
  for (const id of ids) await sql(`INSERT INTO orders VALUES (${id}, 'new', NULL)`);
}

/** The next `n` items of an iterator. */
async function take(it, n) {
  const out = [];
  while (out.length < n) {
    const { value, done } = await it.next();
    assert.ok(!done, `the iteration ended after ${out.length} of ${n} items`);
    out.push(value);
  }
  return out;
}

test("subscribe: initialized, then typed changes; initial state first when asked", async () => {
  const sub = admin.subscribe({ table: "orders", filter: { create: {} } })[Symbol.asyncIterator]();
  const [init] = await take(sub, 1);
  assert.equal(init.type, "initialized");
  assert.match(init.position, /^[0-9A-F]{16}-[0-9]{10}$/);
  await insertOrders([1, 2]);
  const changes = await take(sub, 2);
  assert.deepEqual(changes.map((c) => [c.type, c.action, c.created.id]), [
    ["change", "create", 1],
    ["change", "create", 2],
  ]);
  assert.equal(changes[0].cursor, changes[0].position);
  await sub.return();

  const withRows = admin.subscribe({
    table: "orders",
    filter: { create: { id: { in: [1, 2] } } },
    initialState: true,
  })[Symbol.asyncIterator]();
  const items = await take(withRows, 4);
  assert.deepEqual(items.map((i) => i.type), ["initialized", "snapshot", "snapshot", "snapshotComplete"]);
  assert.deepEqual(items.slice(1, 3).map((i) => i.row.id).sort(), [1, 2]);
  await withRows.return();
});

test("stream: a forced disconnect mid-stream loses nothing and doubles nothing acknowledged", async () => {
  await admin.streams.create({ name: "ts_resume", table: "orders", filter: { create: {} } });
  await insertOrders([101, 102, 103, 104, 105, 106, 107, 108]);
  const seen = [];
  const acked = new Set();
  let cut = false;
  for await (const ev of admin.stream("ts_resume")) {
    if (ev.type !== "change") continue;
    const id = ev.created.id;
    assert.ok(!acked.has(id), `${id} came again after its ack`);
    seen.push(id);
    if (id === 104 && !cut) {
      // 104 is not acknowledged before the cut: it comes again unless a later ack (of a
      // change the old connection had already buffered) covers it.
      cut = true;
      await call("/cut");
      // These can only come over a new connection.
      await insertOrders([109, 110]);
      continue;
    }
    await ev.ack();
    for (const s of seen) acked.add(s);
    if (id === 110) break;
  }
  assert.deepEqual([...new Set(seen)], [101, 102, 103, 104, 105, 106, 107, 108, 109, 110]);
  assert.deepEqual(seen.filter((id) => id !== 104), [101, 102, 103, 105, 106, 107, 108, 109, 110]);
  // The stream's cursor is where the last ack put it: nothing of it comes again.
  await insertOrders([111]);
  const next = admin.stream("ts_resume")[Symbol.asyncIterator]();
  const [init, change] = await take(next, 2);
  assert.equal(init.type, "initialized");
  assert.equal(change.created.id, 111);
  await change.ack();
  await next.return();
});

test("stream: a cut while reading an initial state resumes after the last acknowledged row", async () => {
  await sql("INSERT INTO orders SELECT g, 'bulk', NULL FROM generate_series(1000, 1019) g");
  await admin.streams.create({
    name: "ts_rows",
    table: "orders",
    filter: { create: { status: "bulk" } },
    initialState: true,
  });
  const rows = [];
  let cut = false;
  for await (const ev of admin.stream("ts_rows")) {
    if (ev.type === "snapshot") {
      rows.push(ev.row.id);
      await ev.ack();
      if (rows.length === 7 && !cut) {
        cut = true;
        await call("/cut");
      }
    } else if (ev.type === "snapshotComplete") {
      await ev.ack();
      break;
    }
  }
  assert.deepEqual(rows.sort((a, b) => a - b), Array.from({ length: 20 }, (_, i) => 1000 + i));
});

test("stale cursor: StaleCursorError with advice; a reset with the initial state starts over", async () => {
  await admin.streams.create({ name: "ts_stale", table: "orders", filter: { create: { status: "stale" } } });
  await sql("INSERT INTO orders VALUES (2001, 'stale', NULL)");
  await sql("INSERT INTO orders VALUES (2002, 'stale', NULL)");
  await call("/prune", { contains: { created: { id: 2002 } } });
  await assert.rejects(
    async () => {
      for await (const _ of admin.stream("ts_stale")) {
        /* nothing comes */
      }
    },
    (e) => e instanceof StaleCursorError && e.stream === "ts_stale" && /current rows/.test(e.advice),
  );
  await admin.streams.reset("ts_stale", { initialState: true });
  const it = admin.stream("ts_stale")[Symbol.asyncIterator]();
  const items = await take(it, 4);
  assert.deepEqual(items.map((i) => i.type), ["initialized", "snapshot", "snapshot", "snapshotComplete"]);
  await items[3].ack();
  await it.return();
});

test("busy stream: StreamBusyError; aborting the holder ends its iteration cleanly", async () => {
  await admin.streams.create({ name: "ts_busy", table: "orders" });
  const holder = new AbortController();
  const first = admin.stream("ts_busy", { signal: holder.signal })[Symbol.asyncIterator]();
  const [init] = await take(first, 1);
  assert.equal(init.type, "initialized");
  const impatient = new Waltap({ url, key: process.env.WALTAP_ADMIN_KEY, busyTimeoutMs: 0 });
  await assert.rejects(async () => {
    for await (const _ of impatient.stream("ts_busy")) {
      /* refused */
    }
  }, StreamBusyError);
  holder.abort();
  assert.deepEqual(await first.next(), { value: undefined, done: true });
  // The lease is released: a patient client gets in.
  const again = admin.stream("ts_busy")[Symbol.asyncIterator]();
  assert.equal((await take(again, 1))[0].type, "initialized");
  await again.return();
});

test("tokens: an expired one is TokenExpiredError, a token function is asked again", async () => {
  await admin.streams.create({ name: "ts_token", table: "orders", filter: { create: { status: "tok" } } });
  const expired = await call("/expired-token", { stream: "ts_token" });
  const browser = new Waltap({ url, token: expired });
  await assert.rejects(async () => {
    for await (const _ of browser.stream("ts_token")) {
      /* refused */
    }
  }, TokenExpiredError);

  let asked = 0;
  const renewing = new Waltap({
    url,
    token: async () => {
      asked += 1;
      if (asked === 1) return expired;
      return (await admin.createToken({ stream: "ts_token", ttlSeconds: 60 })).token;
    },
  });
  await sql("INSERT INTO orders VALUES (3001, 'tok', NULL)");
  for await (const ev of renewing.stream("ts_token")) {
    if (ev.type === "change") {
      assert.equal(ev.created.id, 3001);
      await ev.ack();
      break;
    }
  }
  assert.equal(asked, 2);
});

test("unauthorized: a wrong key is UnauthorizedError for management and delivery", async () => {
  const wrong = new Waltap({ url, key: "not-a-key" });
  await assert.rejects(() => wrong.streams.list(), UnauthorizedError);
  await assert.rejects(async () => {
    for await (const _ of wrong.stream("ts_resume")) {
      /* refused */
    }
  }, UnauthorizedError);
  await assert.rejects(
    () => admin.streams.create({ name: "ts_bad", table: "no_such_table" }),
    (e) => e instanceof WaltapError && e.code === "unknown_table" && e.status === 400,
  );
});

test("int8=string: bigint values arrive exactly, also in arrays", async () => {
  const exact = new Waltap({ url, key: process.env.WALTAP_ADMIN_KEY, int8: "string" });
  const sub = exact.subscribe({ table: "big" })[Symbol.asyncIterator]();
  await take(sub, 1);
  await admin.streams.create({ name: "ts_big", table: "big" });
  await admin.streams.create({ name: "ts_big_feed", table: "big" });
  await sql("INSERT INTO big VALUES (9007199254740993, -9223372036854775808, '{1,NULL,9223372036854775807}', 'x')");
  const [change] = await take(sub, 1);
  assert.deepEqual(change.created, {
    id: "9007199254740993",
    n: "-9223372036854775808",
    ns: ["1", null, "9223372036854775807"],
    note: "x",
  });
  await sub.return();
  for await (const ev of exact.stream("ts_big")) {
    if (ev.type !== "change") continue;
    assert.equal(ev.created.id, "9007199254740993");
    await ev.ack();
    break;
  }
  // The pull feed takes the option too.
  const page = await fetch(`${url}/v1/streams/ts_big_feed/events?int8=string&wait=30`, {
    headers: { Authorization: `Bearer ${process.env.WALTAP_ADMIN_KEY}` },
  }).then((r) => r.json());
  assert.equal(page.events[0].created.n, "-9223372036854775808");
});

/** Polls `check` until it holds (the test's own timeout bounds it). */
async function waitFor(check) {
  while (!(await check().catch(() => false))) await delay(50);
}

test("the example service keeps a cache of orders in sync", { timeout: 120_000 }, async () => {
  const child = spawn(process.execPath, ["examples/cache-sync.mjs"], {
    env: { ...process.env, WALTAP_KEY: process.env.WALTAP_ADMIN_KEY, PORT: "0" },
    stdio: ["ignore", "pipe", "inherit"],
  });
  try {
    const port = await new Promise((resolve, reject) => {
      child.stdout.on("data", (d) => {
        const m = /listening on (\d+)/.exec(String(d));
        if (m) resolve(Number(m[1]));
      });
      child.on("exit", (code) => reject(new Error(`the example exited with ${code}`)));
    });
    const order = (id) => fetch(`http://127.0.0.1:${port}/orders/${id}`);
    await waitFor(async () => (await order(1)).status === 200);
    await sql("UPDATE orders SET status = 'cached' WHERE id = 1");
    await waitFor(async () => (await (await order(1)).json()).status === "cached");
    await sql("DELETE FROM orders WHERE id = 2");
    await waitFor(async () => (await order(2)).status === 404);
  } finally {
    child.kill("SIGTERM");
    await once(child, "exit");
  }
});

test("a subscriber that cannot keep up gets LaggedError", async () => {
  const sub = admin.subscribe({ table: "orders" })[Symbol.asyncIterator]();
  await take(sub, 1);
  // Far more than the server's queue (16) and the connection's buffers hold.
  await sql("INSERT INTO orders SELECT g, repeat('x', 1000), NULL FROM generate_series(10000, 14999) g");
  await assert.rejects(async () => {
    for (;;) {
      const { done } = await sub.next();
      assert.ok(!done);
    }
  }, LaggedError);
});
