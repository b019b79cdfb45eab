// Compiled by `tsc -p tsconfig.json` (never run): the declarations give what a TypeScript
// user expects, and misuse does not compile.
import { Waltap, StaleCursorError, type Item } from "../src/index.js";

interface Order {
  id: number;
  status: "new" | "paid" | null;
  total: string;
}

async function handle(client: Waltap, signal: AbortSignal): Promise<void> {
  for await (const ev of client.stream<Order>("billing", { signal })) {
    switch (ev.type) {
      case "change":
        if (ev.action === "create") {
          const id: number = ev.created.id;
          void id;
        } else if (ev.action === "update") {
          const status: Order["status"] = ev.after.status;
          const before: number | undefined = ev.before?.id;
          void status;
          void before;
        }
        break;
      case "snapshot": {
        const total: string = ev.row.total;
        void total;
        break;
      }
      case "snapshotComplete":
      case "initialized": {
        const position: string = ev.position;
        void position;
        break;
      }
    }
    await ev.ack();
  }
  const items: AsyncIterable<Item<Order>> = client.subscribe<Order>({ table: "orders", initialState: true });
  void items;
  // @ts-expect-error: rows are typed
  for await (const ev of client.stream<Order>("billing")) if (ev.type === "change" && ev.action === "create") ev.created.nope;
  try {
    await client.streams.reset("billing", { initialState: true });
  } catch (e) {
    if (e instanceof StaleCursorError) console.log(e.advice, e.stream);
  }
  const token = await client.createToken({ stream: "billing", ttlSeconds: 600 });
  new Waltap({ url: "http://x", token: token.token, int8: "string" });
  // @ts-expect-error: int8 is "number" or "string"
  new Waltap({ url: "http://x", int8: "bigint" });
}
void handle;
