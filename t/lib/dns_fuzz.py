#!/usr/bin/env python3
"""t/lib/dns_fuzz.py - a hostile DNS server for t/050-discovery-dns.t: it answers every question with a reply that is
wrong in some way (a valid reply with random bytes changed, cut short, or lengthened; random bytes), keeping the
question's ID so that the client parses deep into it. Loopback only, bounded in time.

    python3 t/lib/dns_fuzz.py --port 26654 --seconds 30 [--seed 1]
"""

import argparse
import random
import socket
import struct
import time


def valid_reply(query):
    """A well-formed answer to `query`: an A record (127.0.0.1) or an SRV record with its target's A record."""
    qid, = struct.unpack(">H", query[:2])
    end = query.index(b"\0", 12) + 5
    question = query[12:end]
    qtype, = struct.unpack(">H", query[end - 4:end - 2])
    name = b"\xc0\x0c"
    if qtype == 33:
        target = b"\x01b\x04test\x00"
        srv = struct.pack(">HHH", 0, 1, 8080) + target
        answer = name + struct.pack(">HHIH", 33, 1, 5, len(srv)) + srv
        extra = target + struct.pack(">HHIH", 1, 1, 5, 4) + bytes([127, 0, 0, 1])
        counts = (1, 1, 0, 1)
    else:
        answer = name + struct.pack(">HHIH", 1, 1, 5, 4) + bytes([127, 0, 0, 1])
        extra, counts = b"", (1, 1, 0, 0)
    return struct.pack(">HHHHHH", qid, 0x8180, *counts) + question + answer + extra


def hostile(query, rng):
    reply = bytearray(valid_reply(query))
    kind = rng.randrange(4)
    if kind == 0:  # bytes changed after the ID
        for _ in range(rng.randint(1, 6)):
            reply[rng.randrange(2, len(reply))] = rng.randrange(256)
    elif kind == 1:  # cut short
        reply = reply[:rng.randrange(2, len(reply))]
    elif kind == 2:  # counts and lengths that promise more than there is
        reply[6:12] = bytes(rng.randrange(256) for _ in range(6))
        reply += bytes(rng.randrange(256) for _ in range(rng.randrange(0, 8)))
    else:  # random bytes behind the right ID
        reply = reply[:2] + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
    return bytes(reply)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", a.port))
    sock.settimeout(0.2)
    deadline = time.monotonic() + a.seconds
    answered = 0
    while time.monotonic() < deadline:
        try:
            query, peer = sock.recvfrom(512)
        except socket.timeout:
            continue
        try:
            sock.sendto(hostile(query, rng), peer)
            answered += 1
        except (ValueError, OSError):
            pass
        if answered % 50 == 0:
            print("answered", answered, flush=True)
    print("answered", answered, flush=True)


if __name__ == "__main__":
    main()
