//! Arbitrary sequences of register accesses (any offset in the 512-byte
//! window, any width, any value), guest memory writes, queue and backend
//! events and save/restore cycles against the virtio-mmio transport of a
//! virtio-blk device. Nothing may panic or hang.
//!
//! Input: 8-byte operations `[op, off_lo, off_hi, width, v0, v1, v2, v3]`:
//! op % 6 = 0 read, 1 write (offset % 0x200, width 1/2/4/8 by width % 4),
//! 2 write v as u32 to guest memory at off, 3 queue event (queue width % 2),
//! 4 backend event, 5 drain + save + restore.

#![no_main]

use basalt_vmm_fuzz::{Rig, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut rig = Rig::new(false);
    for op in data.chunks_exact(8).take(4096) {
        let off = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let width = [1usize, 2, 4, 8][usize::from(op[3] % 4)];
        let v = [op[4], op[5], op[6], op[7], op[4], op[5], op[6], op[7]];
        match op[0] % 6 {
            0 => {
                let mut buf = [0xa5u8; 8];
                rig.t.read(off % 0x200, &mut buf[..width]);
            }
            1 => rig.t.write(off % 0x200, &v[..width]),
            2 => {
                let at = off % (MEM_SIZE as u64 - 3);
                rig.mem.write_slice(&v[..4], GuestAddress(at)).expect("inside guest memory");
            }
            3 => rig.t.handle_queue_event(usize::from(op[3] % 2)),
            4 => rig.t.handle_backend_event(),
            _ => rig.save_restore(),
        }
    }
});
