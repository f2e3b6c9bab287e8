//! What device models share about descriptor chains: their buffers as
//! guest-memory segments, read and written in order.

use crate::memory::GuestRam;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A chain's buffers: the device-readable ones, then the device-writable
/// ones, each checked to lie in guest memory.
#[derive(Debug, Default)]
pub(crate) struct Buffers {
    pub readable: Vec<Seg>,
    pub writable: Vec<Seg>,
    pub readable_len: u64,
    pub writable_len: u64,
}

/// Walks a chain (at most `queue_size` descriptors), refusing one that
/// loops, links to an invalid descriptor, puts a readable buffer after a
/// writable one or points outside guest memory.
pub(crate) fn buffers(
    chain: DescriptorChain<&GuestRam>,
    queue_size: u16,
    mem: &GuestRam,
) -> Result<Buffers, &'static str> {
    let mut b = Buffers::default();
    let mut n = 0usize;
    let mut last_has_next = false;
    for d in chain {
        n += 1;
        if n > usize::from(queue_size) {
            return Err("chain longer than the queue");
        }
        last_has_next = d.has_next();
        if d.len() == 0 {
            continue;
        }
        let seg = Seg { addr: d.addr(), len: d.len() };
        let perm = if d.is_write_only() { Permissions::Write } else { Permissions::Read };
        if !mem.check_range(seg.addr, seg.len as usize, perm) {
            return Err("buffer outside guest memory");
        }
        if d.is_write_only() {
            b.writable.push(seg);
            b.writable_len += u64::from(seg.len);
        } else {
            if !b.writable.is_empty() {
                return Err("device-readable descriptor after a device-writable one");
            }
            b.readable.push(seg);
            b.readable_len += u64::from(seg.len);
        }
    }
    // The iterator stops early, with the last descriptor still pointing on,
    // on a loop, an out-of-range index or an unreadable descriptor.
    if last_has_next {
        return Err("chain loops or links to an invalid descriptor");
    }
    if n == 0 {
        return Err("empty or unreadable chain");
    }
    Ok(b)
}

/// Reads `buf.len()` bytes from the buffers, starting `skip` bytes in.
pub(crate) fn gather(mem: &GuestRam, segs: &[Seg], mut skip: u64, buf: &mut [u8]) -> Option<()> {
    let mut done = 0usize;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let len = u64::from(s.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = ((len - skip) as usize).min(buf.len() - done);
        let addr = s.addr.checked_add(skip)?;
        mem.read_slice(&mut buf[done..done + n], addr).ok()?;
        done += n;
        skip = 0;
    }
    (done == buf.len()).then_some(())
}

/// Writes `data` across the buffers in order.
pub(crate) fn scatter(mem: &GuestRam, segs: &[Seg], data: &[u8]) -> Option<()> {
    let mut done = 0usize;
    for s in segs {
        if done == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - done);
        mem.write_slice(&data[done..done + n], s.addr).ok()?;
        done += n;
    }
    (done == data.len()).then_some(())
}
