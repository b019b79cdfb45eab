// An example service: keeps an in-memory cache of the `orders` table in sync with Postgres
// through waltap, and serves it over HTTP. The stream starts with the current rows
// (initialState), then delivers every change after them; the cursor lives on the server,
// so after a restart the cache is rebuilt from a reset stream.
//
//   WALTAP_URL=http://127.0.0.1:7373 WALTAP_KEY=orders-reader-7f3a9c node examples/cache-sync.mjs
//   curl localhost:8080/orders/7
import http from "node:http";

import { Waltap, StaleCursorError, WaltapError } from "../src/index.js";

const client = new Waltap({ url: process.env.WALTAP_URL ?? "http://127.0.0.1:7373", key: process.env.WALTAP_KEY });
const STREAM = "orders-cache";

/** @type {Map<number, Record<string, unknown>>} */
const orders = new Map();
let ready = false;

async function ensureStream() {
  try {
    await client.streams.create({ name: STREAM, table: "orders", initialState: true });
  } catch (e) {
    if (!(e instanceof WaltapError && e.code === "conflict")) throw e;
    // The cache is in memory: a restarted service starts over from the current rows.
    await client.streams.reset(STREAM, { initialState: true });
  }
}

async function sync(signal) {
  await ensureStream();
  for (;;) {
    try {
      for await (const ev of client.stream(STREAM, { signal })) {
        if (ev.type === "snapshot") orders.set(ev.row.id, ev.row);
        else if (ev.type === "snapshotComplete") ready = true;
        else if (ev.type === "change") {
          if (ev.action === "create") orders.set(ev.created.id, ev.created);
          else if (ev.action === "update") orders.set(ev.after.id, ev.after);
          else if (ev.action === "delete") orders.delete(ev.deleted.id);
          else if (ev.action === "truncate") orders.clear();
        }
        await ev.ack();
      }
      return; // aborted
    } catch (e) {
      if (!(e instanceof StaleCursorError)) throw e;
      // The log no longer holds what we missed: start over from the current rows.
      console.warn(e.advice);
      orders.clear();
      ready = false;
      await client.streams.reset(STREAM, { initialState: true });
    }
  }
}

const stop = new AbortController();
process.on("SIGINT", () => stop.abort());
process.on("SIGTERM", () => stop.abort());

const server = http.createServer((req, res) => {
  const id = Number(req.url?.match(/^\/orders\/(\d+)$/)?.[1]);
  if (!ready) return void res.writeHead(503).end("loading\n");
  const row = orders.get(id);
  res.writeHead(row ? 200 : 404, { "Content-Type": "application/json" }).end(JSON.stringify(row ?? null));
});
server.listen(Number(process.env.PORT ?? 8080), () => console.log(`listening on ${server.address().port}`));
sync(stop.signal)
  .catch((e) => {
    console.error(e);
    process.exitCode = 1;
  })
  .finally(() => server.close());
