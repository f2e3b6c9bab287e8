//! Arbitrary guest memory (both rings, their descriptors and buffers) and
//! arbitrary incoming frames against a live virtio-net device with its
//! DHCP server on: it must
//! never panic, hang, send more than a frame's worth, or lose count of a
//! frame (each is delivered, dropped, or still waiting for buffers).
//!
//! Input: 4 header bytes, then frame lengths, then an image of guest memory.
//! - byte 0: bits 0-2 queue size 2^n (n capped at 4); bit 3 drop EVENT_IDX;
//!   bit 4 drop MRG_RXBUF; bit 5 save and restore between rounds.
//! - byte 1: rounds (1-4) of transmit kick, backend event, receive kick.
//! - byte 2: added to both available indices before each later round.
//! - byte 3: incoming frames (0-7); each takes 2 bytes of length
//!   (little-endian, up to 70000: beyond the largest frame too).
//! Rings: receive at 0x0/0x100/0x200, transmit at 0x300/0x400/0x500.

#![no_main]

use basalt_vmm::devices::virtio::{MmioTransport, VirtioNet};
use basalt_vmm_fuzz::net::{self, NetRig, TX_AVAIL};
use basalt_vmm_fuzz::{AVAIL, MEM_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const F_EVENT_IDX: u64 = 1 << 29;
const F_MRG_RXBUF: u64 = 1 << 15;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (hdr, rest) = data.split_at(4);
    let flags = hdr[0];
    let queue_size = 1u32 << (flags & 7).min(4);
    let mut drop = 0;
    if flags & 8 != 0 {
        drop |= F_EVENT_IDX;
    }
    if flags & 16 != 0 {
        drop |= F_MRG_RXBUF;
    }
    let rounds = 1 + (hdr[1] % 4);
    let bump = u16::from(hdr[2]);
    let n = usize::from(hdr[3] % 8);
    if rest.len() < 2 * n {
        return;
    }
    let (lens, image) = rest.split_at(2 * n);
    let frames: Vec<Vec<u8>> = lens
        .chunks_exact(2)
        .map(|l| {
            let len = usize::from(u16::from_le_bytes([l[0], l[1]])) + usize::from(l[0] & 1) * 4464;
            (0..len).map(|i| i as u8).collect()
        })
        .collect();

    let mut rig = NetRig::new();
    if !rig.init(drop, queue_size) {
        return;
    }
    let image = &image[..image.len().min(MEM_SIZE)];
    rig.mem.write_slice(image, GuestAddress(0)).expect("image fits guest memory");
    rig.frames.inbound.lock().expect("lock").extend(frames.iter().cloned());

    for round in 0..rounds {
        if round > 0 {
            for avail in [AVAIL, TX_AVAIL] {
                let idx: u16 = rig.mem.read_obj(GuestAddress(avail + 2)).expect("avail idx");
                rig.mem.write_obj(idx.wrapping_add(bump), GuestAddress(avail + 2)).expect("avail idx");
            }
            if flags & 32 != 0 {
                let state = rig.t.save();
                let net_state = rig.t.device().save();
                let mut dev = VirtioNet::new(Box::new(rig.frames.clone()), net::config()).expect("device");
                dev.restore(&net_state).expect("same NIC");
                let mut t = MmioTransport::new(Box::new(dev), rig.mem.clone(), EventFd::new(EFD_NONBLOCK).expect("eventfd"))
                    .expect("transport");
                t.restore(&state).expect("a saved state restores");
                assert_eq!(t.save(), state, "restore reproduces the saved state");
                rig.t = t;
            }
        }
        rig.t.handle_queue_event(1);
        rig.t.handle_backend_event();
        rig.t.handle_queue_event(0);
    }
    let c = rig.t.device().counters();
    if flags & 32 == 0 {
        // Each frame taken from the backend was delivered, dropped, or is
        // the one waiting for buffers (a restored device starts its
        // counters afresh, so only without save/restore).
        // DHCP answers from the VMM count as received frames too; some may
        // still be queued, so the exact count holds only without them.
        let left = rig.frames.inbound.lock().expect("lock").len() as u64;
        let seen = c.rx_frames + c.rx_dropped + left;
        let offered = frames.len() as u64 + c.dhcp_replies;
        assert!(seen <= offered, "{} frames: {c:?}", frames.len());
        assert!(c.dhcp_replies > 0 || offered - seen <= 1, "{} frames: {c:?}", frames.len());
    }
});
