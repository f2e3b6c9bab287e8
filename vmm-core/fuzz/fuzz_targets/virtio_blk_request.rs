//! Arbitrary guest memory (descriptor table, available ring, request
//! headers, data) against a live virtio-blk device: the device must never
//! panic, hang, or leave requests in flight.
//!
//! Input: 4 header bytes, then an image of guest memory from address 0.
//! - byte 0: bits 0-2 queue size 2^n (n capped at 4: 1..16); bit 3 drop
//!   EVENT_IDX; bit 4 drop DISCARD and WRITE_ZEROES; bit 5 read-only disk;
//!   bit 6 save and restore the device between rounds.
//! - byte 1: rounds (1-4) of kick + completion processing.
//! - byte 2: added to the available index before each later round, so
//!   later rounds see new (or reused) entries.
//! - byte 3: reserved.
//! Rings: descriptors at 0x0, available ring at 0x100, used ring at 0x200.

#![no_main]

use basalt_vmm_fuzz::{Rig, AVAIL, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const F_EVENT_IDX: u64 = 1 << 29;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (hdr, image) = data.split_at(4);
    let flags = hdr[0];
    let queue_size = 1u32 << (flags & 7).min(4);
    let mut drop = 0;
    if flags & 8 != 0 {
        drop |= F_EVENT_IDX;
    }
    if flags & 16 != 0 {
        drop |= F_DISCARD | F_WRITE_ZEROES;
    }
    let rounds = 1 + (hdr[1] % 4);
    let bump = u16::from(hdr[2]);

    let mut rig = Rig::new(flags & 32 != 0);
    if !rig.init(drop, queue_size) {
        return;
    }
    let image = &image[..image.len().min(MEM_SIZE)];
    rig.mem.write_slice(image, GuestAddress(0)).expect("image fits guest memory");

    for round in 0..rounds {
        if round > 0 {
            let idx: u16 = rig.mem.read_obj(GuestAddress(AVAIL + 2)).expect("avail idx");
            rig.mem.write_obj(idx.wrapping_add(bump), GuestAddress(AVAIL + 2)).expect("avail idx");
            if flags & 64 != 0 {
                rig.save_restore();
            }
        }
        rig.kick();
        // The file backend completes at submission: after one pass over the
        // completions nothing may be left, unless the device is throttled
        // and picked up more chains, which the next pass finishes.
        rig.t.handle_backend_event();
    }
    rig.t.drain(std::time::Duration::from_secs(10)).expect("drains");
    assert_eq!(rig.t.device().in_flight(), 0);
});
