"""Runs against a real `waltap serve` started by the Rust test `server::clients` (cargo
test), which sets WALTAP_URL (through a proxy it can cut), the keys and WALTAP_CONTROL."""

import asyncio
import json
import os
import unittest
import urllib.request

import waltap

URL = os.environ.get("WALTAP_URL")
CONTROL = os.environ.get("WALTAP_CONTROL")
ADMIN_KEY = os.environ.get("WALTAP_ADMIN_KEY")


def _post(path, body):
    data = body.encode() if isinstance(body, str) else json.dumps(body or {}).encode()
    req = urllib.request.Request(CONTROL + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


async def call(path, body=None):
    return await asyncio.get_running_loop().run_in_executor(None, _post, path, body)


async def sql(text):
    await call("/sql", text)


async def take(it, n):
    out = []
    while len(out) < n:
        out.append(await it.__anext__())
    return out


async def drain(it):
    async for _ in it:
        pass


@unittest.skipUnless(URL and CONTROL, "run through `cargo test --test main -- server::clients`")
class ClientTest(unittest.IsolatedAsyncioTestCase):
    def setUp(self):
        self.admin = waltap.Client(URL, key=ADMIN_KEY, backoff=(0.05, 0.5))

    async def test_subscribe_then_initial_state(self):
        sub = self.admin.subscribe(table="orders", filter={"create": {}})
        (init,) = await take(sub, 1)
        self.assertEqual(init.type, "initialized")
        await sql("INSERT INTO orders VALUES (1, 'new', NULL)")
        await sql("INSERT INTO orders VALUES (2, 'new', NULL)")
        changes = await take(sub, 2)
        self.assertEqual([(c.type, c["action"], c["created"]["id"]) for c in changes],
                         [("change", "create", 1), ("change", "create", 2)])
        self.assertEqual(changes[0].cursor, changes[0]["position"])
        await sub.aclose()
        rows = self.admin.subscribe(table="orders", filter={"create": {"id": {"in": [1, 2]}}},
                                     initial_state=True)
        items = await take(rows, 4)
        self.assertEqual([i.type for i in items],
                         ["initialized", "snapshot", "snapshot", "snapshotComplete"])
        await rows.aclose()

    async def test_forced_disconnect_loses_nothing_and_doubles_nothing_acknowledged(self):
        await self.admin.create_stream("py_resume", "orders", filter={"create": {"status": "r"}})
        for i in range(101, 109):
            await sql(f"INSERT INTO orders VALUES ({i}, 'r', NULL)")
        seen, acked, cut = [], set(), False
        async for ev in self.admin.stream("py_resume"):
            if ev.type != "change":
                continue
            ident = ev["created"]["id"]
            self.assertNotIn(ident, acked, "came again after its ack")
            seen.append(ident)
            if ident == 104 and not cut:
                cut = True
                await call("/cut")
                # These can only come over a new connection.
                for i in (109, 110):
                    await sql(f"INSERT INTO orders VALUES ({i}, 'r', NULL)")
                continue
            await ev.ack()
            acked.update(seen)
            if ident == 110:
                break
        self.assertEqual(list(dict.fromkeys(seen)), list(range(101, 111)))
        self.assertEqual([i for i in seen if i != 104], [101, 102, 103] + list(range(105, 111)))
        await sql("INSERT INTO orders VALUES (111, 'r', NULL)")
        again = self.admin.stream("py_resume")
        init, change = await take(again, 2)
        self.assertEqual((init.type, change["created"]["id"]), ("initialized", 111))
        await change.ack()
        await again.aclose()

    async def test_stale_cursor_then_reset(self):
        await self.admin.create_stream("py_stale", "orders", filter={"create": {"status": "stale"}})
        await sql("INSERT INTO orders VALUES (2001, 'stale', NULL)")
        await call("/prune", {"contains": {"created": {"id": 2001}}})
        with self.assertRaises(waltap.StaleCursorError) as caught:
            await drain(self.admin.stream("py_stale"))
        self.assertEqual(caught.exception.stream, "py_stale")
        self.assertIn("current rows", caught.exception.advice)
        await self.admin.reset_stream("py_stale", initial_state=True)
        it = self.admin.stream("py_stale")
        items = await take(it, 3)
        self.assertEqual([i.type for i in items], ["initialized", "snapshot", "snapshotComplete"])
        await items[2].ack()
        await it.aclose()

    async def test_busy_stream(self):
        await self.admin.create_stream("py_busy", "orders")
        holder = self.admin.stream("py_busy")
        self.assertEqual((await take(holder, 1))[0].type, "initialized")
        impatient = waltap.Client(URL, key=ADMIN_KEY, busy_timeout=0)
        with self.assertRaises(waltap.StreamBusyError):
            await drain(impatient.stream("py_busy"))
        await holder.aclose()
        again = self.admin.stream("py_busy")
        self.assertEqual((await take(again, 1))[0].type, "initialized")
        await again.aclose()

    async def test_expired_token_and_renewal(self):
        await self.admin.create_stream("py_token", "orders", filter={"create": {"status": "tok"}})
        expired = await call("/expired-token", {"stream": "py_token"})
        with self.assertRaises(waltap.TokenExpiredError):
            await drain(waltap.Client(URL, token=expired).stream("py_token"))
        asked = []

        async def token():
            asked.append(1)
            if len(asked) == 1:
                return expired
            return (await self.admin.create_token(stream="py_token", ttl_seconds=60))["token"]

        await sql("INSERT INTO orders VALUES (3001, 'tok', NULL)")
        async for ev in waltap.Client(URL, token=token).stream("py_token"):
            if ev.type == "change":
                self.assertEqual(ev["created"]["id"], 3001)
                await ev.ack()
                break
        self.assertEqual(len(asked), 2)

    async def test_unauthorized_and_other_codes(self):
        wrong = waltap.Client(URL, key="not-a-key")
        with self.assertRaises(waltap.UnauthorizedError):
            await wrong.list_streams()
        with self.assertRaises(waltap.UnauthorizedError):
            await drain(wrong.stream("anything"))
        with self.assertRaises(waltap.WaltapError) as caught:
            await self.admin.create_stream("py_bad", "no_such_table")
        self.assertEqual((caught.exception.code, caught.exception.status), ("unknown_table", 400))

    async def test_int8_as_strings(self):
        exact = waltap.Client(URL, key=ADMIN_KEY, int8="string")
        await exact.create_stream("py_big", "big")
        await sql("INSERT INTO big VALUES (9007199254740993, NULL, '{1,NULL}', 'p')")
        async for ev in exact.stream("py_big"):
            if ev.type == "change":
                self.assertEqual(ev["created"], {"id": "9007199254740993", "n": None,
                                                 "ns": ["1", None], "note": "p"})
                await ev.ack()
                break


if __name__ == "__main__":
    unittest.main()
