#!/usr/bin/env python3
"""Writes the seed corpora: a few well-formed and malformed requests and
register sequences (a Linux-style probe) that the fuzzers start from."""
import os
os.chdir(os.path.dirname(os.path.abspath(__file__)))
import struct
NEXT, WRITE, INDIRECT = 1, 2, 4
def mem_image(size=0x3000):
    return bytearray(size)
def put(m, at, b): m[at:at+len(b)] = b
def desc(m, table, i, addr, ln, flags, nxt):
    put(m, table + 16*i, struct.pack('<QIHH', addr, ln, flags, nxt))
def hdr(m, at, t, sector): put(m, at, struct.pack('<IIQ', t, 0, sector))
def chain(m, start, ds):
    for k,(a,l,f) in enumerate(ds):
        last = k == len(ds)-1
        desc(m, 0, start+k, a, l, f | (0 if last else NEXT), start+k+1)
    return start
def avail(m, heads):
    put(m, 0x100, struct.pack('<HH', 0, len(heads)))
    for i,h in enumerate(heads): put(m, 0x104 + 2*i, struct.pack('<H', h))
def seed(name, header, m):
    os.makedirs('corpus/virtio_blk_request', exist_ok=True)
    open(f'corpus/virtio_blk_request/{name}', 'wb').write(bytes(header) + bytes(m).rstrip(b'\0'))

IN, OUT, FLUSH, GET_ID, DISCARD, WZ = 0, 1, 4, 8, 11, 13
# 1: write then read one sector.
m = mem_image(); put(m, 0x1000, bytes((i*7) & 0xff for i in range(512)))
hdr(m, 0x400, OUT, 3); hdr(m, 0x420, IN, 3)
a = chain(m, 0, [(0x400,16,0),(0x1000,512,0),(0x410,1,WRITE)])
b = chain(m, 3, [(0x420,16,0),(0x2000,512,WRITE),(0x430,1,WRITE)])
avail(m, [a,b]); seed('write_read', [4,0,0,0], m)
# 2: flush and get-id.
m = mem_image(); hdr(m, 0x400, FLUSH, 0); hdr(m, 0x420, GET_ID, 0)
a = chain(m, 0, [(0x400,16,0),(0x410,1,WRITE)])
b = chain(m, 2, [(0x420,16,0),(0x1000,20,WRITE),(0x430,1,WRITE)])
avail(m, [a,b]); seed('flush_get_id', [4,0,0,0], m)
# 3: discard and write-zeroes.
m = mem_image(); hdr(m, 0x400, DISCARD, 0); hdr(m, 0x440, WZ, 0)
put(m, 0x1000, struct.pack('<QII', 8, 16, 0)); put(m, 0x1010, struct.pack('<QII', 40, 8, 1))
a = chain(m, 0, [(0x400,16,0),(0x1000,16,0),(0x410,1,WRITE)])
b = chain(m, 3, [(0x440,16,0),(0x1010,16,0),(0x450,1,WRITE)])
avail(m, [a,b]); seed('discard_write_zeroes', [4,0,0,0], m)
# 4: an indirect OUT of two sectors in two buffers.
m = mem_image(); hdr(m, 0x400, OUT, 10)
for i,(ad,l,f,n) in enumerate([(0x400,16,NEXT,1),(0x1000,512,NEXT,2),(0x1400,512,NEXT,3),(0x410,1,WRITE,0)]):
    desc(m, 0x800, i, ad, l, f, n)
desc(m, 0, 0, 0x800, 64, INDIRECT, 0)
avail(m, [0]); seed('indirect_out', [4,0,0,0], m)
# 5: malformed: a loop, a sector past the end, then a good read.
m = mem_image(); hdr(m, 0x400, IN, 0); hdr(m, 0x420, IN, 1 << 40); hdr(m, 0x440, IN, 0)
desc(m, 0, 0, 0x400, 16, NEXT, 1); desc(m, 0, 1, 0x1000, 512, NEXT|WRITE, 0)
chain(m, 2, [(0x420,16,0),(0x1000,512,WRITE),(0x430,1,WRITE)])
chain(m, 5, [(0x440,16,0),(0x1000,512,WRITE),(0x450,1,WRITE)])
avail(m, [0,2,5]); seed('malformed', [4,0,0,0], m)
# 6: several rounds, the same chain re-offered each round, saved and restored.
m = mem_image(); hdr(m, 0x400, OUT, 0); put(m, 0x1000, b'\x5a'*1024)
chain(m, 0, [(0x400,16,0),(0x1000,1024,0),(0x410,1,WRITE)])
put(m, 0x100, struct.pack('<HH', 0, 1))
for i in range(16): put(m, 0x104 + 2*i, struct.pack('<H', 0))
seed('rounds_save_restore', [4 | 64, 3, 1, 0], m)
# 7: small queue, no event idx, read-only disk with a write and a read.
m = mem_image(); hdr(m, 0x400, OUT, 0); hdr(m, 0x420, IN, 0)
a = chain(m, 0, [(0x400,16,0),(0x1000,512,0),(0x410,1,WRITE)])
avail(m, [a]); seed('read_only_small_queue', [1 | 8 | 32, 0, 0, 0], m)

# virtio-net: header [flags, rounds, bump, frames], frame lengths, memory.
def net_seed(name, header, lens, m):
    os.makedirs('corpus/virtio_net_frames', exist_ok=True)
    body = b''.join(struct.pack('<H', l) for l in lens)
    open(f'corpus/virtio_net_frames/{name}', 'wb').write(bytes(header) + body + bytes(m).rstrip(b'\0'))
def ndesc(m, table, i, addr, ln, flags, nxt): put(m, table + 16*i, struct.pack('<QIHH', addr, ln, flags, nxt))
def navail(m, ring, heads):
    put(m, ring, struct.pack('<HH', 0, len(heads)))
    for i,h in enumerate(heads): put(m, ring + 4 + 2*i, struct.pack('<H', h))
# n1: two receive buffers (merged), one 72-byte frame to send, two frames in.
m = mem_image(0x6000)
ndesc(m, 0x0, 0, 0x1000, 1536, WRITE, 0); ndesc(m, 0x0, 1, 0x2000, 1536, WRITE, 0); navail(m, 0x100, [0, 1])
put(m, 0x3000, bytes(12) + bytes(range(60)))
ndesc(m, 0x300, 0, 0x3000, 12, NEXT, 1); ndesc(m, 0x300, 1, 0x300c, 60, 0, 0); navail(m, 0x400, [0])
net_seed('rx_tx', [4, 1, 0, 2], [100, 2000], m)
# n2: no merged buffers, a frame too big for its chain, a bad TX chain, rounds.
m = mem_image(0x6000)
ndesc(m, 0x0, 0, 0x1000, 512, WRITE, 0); navail(m, 0x100, [0])
ndesc(m, 0x300, 0, 0x3000, 80, WRITE, 0); navail(m, 0x400, [0])
net_seed('small_chain_bad_tx', [4 | 16 | 32, 3, 1, 1], [1400], m)

# MMIO register sequences: 8-byte ops [op, off_lo, off_hi, width, v0..v3].
def op(o, off, width, v): return struct.pack('<BHBI', o, off, width, v)
R, W, MEMW, QEVT, BEVT, SAVE = 0, 1, 2, 3, 4, 5
W4 = 2
def linux_init(qs=16, feat_lo=0xffffffff, feat_hi=0xffffffff):
    s = b''
    for r in [0x0, 0x4, 0x8, 0xc]: s += op(R, r, W4, 0)
    s += op(W, 0x70, W4, 0) + op(W, 0x70, W4, 1) + op(W, 0x70, W4, 3)
    s += op(W, 0x14, W4, 0) + op(R, 0x10, W4, 0) + op(W, 0x14, W4, 1) + op(R, 0x10, W4, 0)
    s += op(W, 0x24, W4, 0) + op(W, 0x20, W4, feat_lo & 0x30006246) + op(W, 0x24, W4, 1) + op(W, 0x20, W4, feat_hi & 1)
    s += op(W, 0x70, W4, 11) + op(R, 0x70, W4, 0)
    s += op(W, 0x30, W4, 0) + op(R, 0x34, W4, 0) + op(R, 0x44, W4, 0) + op(W, 0x38, W4, qs)
    s += op(W, 0x80, W4, 0) + op(W, 0x84, W4, 0) + op(W, 0x90, W4, 0x100) + op(W, 0x94, W4, 0)
    s += op(W, 0xa0, W4, 0x200) + op(W, 0xa4, W4, 0) + op(W, 0x44, W4, 1) + op(W, 0x70, W4, 15)
    return s
def memw32(at, v): return op(MEMW, at, 0, v)
def memw_bytes(at, b):
    b = b + bytes(-len(b) % 4)
    return b''.join(memw32(at + i, struct.unpack('<I', b[i:i+4])[0]) for i in range(0, len(b), 4))
def seed2(name, s):
    os.makedirs('corpus/virtio_mmio_registers', exist_ok=True)
    open(f'corpus/virtio_mmio_registers/{name}', 'wb').write(s)
# A full probe, one FLUSH request, kick, completion, interrupt ack, config reads.
req = memw_bytes(0x400, struct.pack('<IIQ', FLUSH, 0, 0))
req += memw_bytes(0x0, struct.pack('<QIHH', 0x400, 16, NEXT, 1) + struct.pack('<QIHH', 0x410, 1, WRITE, 0))
req += memw_bytes(0x100, struct.pack('<HHH', 0, 1, 0))
tail = op(W, 0x50, W4, 0) + op(BEVT, 0, 0, 0) + op(R, 0x60, W4, 0) + op(W, 0x64, W4, 1)
cfg = b''.join(op(R, 0x100 + o, w, 0) for o, w in [(0,3),(0,2),(4,2),(8,2),(12,2),(20,2),(36,2),(56,0),(0xfc,2)]) + op(R, 0xfc, W4, 0)
seed2('linux_probe_flush', linux_init() + req + tail + cfg)
seed2('probe_then_save_restore', linux_init() + req + op(QEVT, 0, 0, 0) + op(SAVE, 0, 0, 0) + tail)
seed2('probe_bad_queue_size', linux_init(qs=12) + op(W, 0x70, W4, 0) + linux_init())
seed2('odd_widths', b''.join(op(o, off, w, 0xffffffff) for o in (R, W) for off in (0x0, 0x2, 0x70, 0x101) for w in (0, 1, 3)))
seed2('status_out_of_order', op(W, 0x70, W4, 2) + op(W, 0x70, W4, 8) + op(W, 0x70, W4, 4) + op(W, 0x70, W4, 0x40) + op(W, 0x70, W4, 0x80) + op(W, 0x70, W4, 1) + op(W, 0x20, W4, 1) + op(W, 0x30, W4, 7) + op(R, 0x34, W4, 0))

# DHCP: udhcpc's DISCOVER and a REQUEST for the offered address, as Ethernet frames.
def dhcp_frame(kind, mac, extra=b''):
    b = bytearray(236); b[0:3] = bytes([1, 1, 6]); b[4:8] = b'\xde\xad\xbe\xef'; b[28:34] = mac
    b += bytes([99, 130, 83, 99, 53, 1, kind]) + extra + b'\xff'
    udp = struct.pack('>HHHH', 68, 67, 8 + len(b), 0) + b
    ip = struct.pack('>BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes(4), b'\xff' * 4)
    return b'\xff' * 6 + mac + b'\x08\x00' + ip + udp
def seed3(name, b):
    os.makedirs('corpus/dhcp_messages', exist_ok=True)
    open(f'corpus/dhcp_messages/{name}', 'wb').write(b)
fmac = bytes([0x52, 0x54, 0, 0, 0, 1])
seed3('discover', dhcp_frame(1, fmac, bytes([55, 4, 1, 3, 26, 12])))
seed3('request', dhcp_frame(3, fmac, bytes([50, 4, 10, 10, 0, 7, 54, 4, 10, 10, 0, 1])))
