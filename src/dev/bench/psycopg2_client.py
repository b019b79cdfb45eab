"""The psycopg2 contender of waltap's benchmark (src/dev/bench).

Reads a pgoutput slot with psycopg2's replication support, the fastest Python peer a user
would reach for: decodes every row change's tuples into dicts of column name to text (or
None), keeps the relation messages it needs for that, and acknowledges each transaction
as its commit arrives. Stops after LIMIT row changes, acknowledging what it read. Prints
one line to stdout at its first row change (the benchmark's time to the first event).

Usage: psycopg2_client.py URL SLOT PUBLICATION LIMIT
"""

import struct
import sys

import psycopg2
import psycopg2.extras

url, slot, publication, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

relations = {}  # relid -> column names
seen = 0

unpack_i16 = struct.Struct(">h").unpack_from
unpack_i32 = struct.Struct(">i").unpack_from
unpack_u32 = struct.Struct(">I").unpack_from


def tuple_data(buf, pos, names):
    (n,) = unpack_i16(buf, pos)
    pos += 2
    row = {}
    for i in range(n):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't': text
            (length,) = unpack_i32(buf, pos)
            pos += 4
            row[names[i]] = buf[pos : pos + length].decode()
            pos += length
        elif kind == 0x6E:  # 'n': null
            row[names[i]] = None
        # 'u': unchanged TOAST value, not sent
    return row, pos


def cstring(buf, pos):
    end = buf.index(0, pos)
    return buf[pos:end].decode(), end + 1


def consume(msg):
    global seen
    buf = msg.payload
    kind = buf[0]
    if kind == 0x52:  # 'R': relation
        (relid,) = unpack_u32(buf, 1)
        _, pos = cstring(buf, 5)
        _, pos = cstring(buf, pos)
        pos += 1  # replica identity
        (ncols,) = unpack_i16(buf, pos)
        pos += 2
        names = []
        for _ in range(ncols):
            pos += 1  # flags
            name, pos = cstring(buf, pos)
            names.append(name)
            pos += 8  # type oid, type modifier
        relations[relid] = names
    elif kind == 0x49:  # 'I': insert
        (relid,) = unpack_u32(buf, 1)
        tuple_data(buf, 6, relations[relid])
        seen += 1
    elif kind == 0x55:  # 'U': update, optionally with the old key or row
        (relid,) = unpack_u32(buf, 1)
        names = relations[relid]
        pos = 5
        if buf[pos] in (0x4B, 0x4F):  # 'K' or 'O'
            _, pos = tuple_data(buf, pos + 1, names)
        tuple_data(buf, pos + 1, names)  # 'N'
        seen += 1
    elif kind == 0x44:  # 'D': delete
        (relid,) = unpack_u32(buf, 1)
        tuple_data(buf, 6, relations[relid])
        seen += 1
    elif kind == 0x43:  # 'C': commit
        msg.cursor.send_feedback(flush_lsn=msg.data_start)
        if seen >= limit:
            msg.cursor.send_feedback(flush_lsn=msg.data_start, force=True)
            raise psycopg2.extras.StopReplication()
    if seen == 1 and kind in (0x49, 0x55, 0x44):
        print("first row change", flush=True)


conn = psycopg2.connect(url, connection_factory=psycopg2.extras.LogicalReplicationConnection)
cur = conn.cursor()
cur.start_replication(
    slot_name=slot,
    decode=False,
    options={"proto_version": "1", "publication_names": publication},
)
try:
    cur.consume_stream(consume)
except psycopg2.extras.StopReplication:
    pass
print(seen, file=sys.stderr)
