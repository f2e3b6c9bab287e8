//! Arbitrary Ethernet frames from the guest against a NIC's DHCP server
//! (every guest frame passes through it): it must never panic, answer a
//! frame that is not a DHCP request from this NIC's MAC, or answer with
//! anything but a well-formed reply to that MAC.
//!
//! Input: the frame itself (seeds: udhcpc's DISCOVER and REQUEST).

#![no_main]

use basalt_vmm::devices::dhcp::{self, Lease, Server, Verdict};
use libfuzzer_sys::fuzz_target;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];

fuzz_target!(|frame: &[u8]| {
    let lease = Lease {
        address: [10, 10, 0, 7].into(),
        prefix: 24,
        gateway: Some([10, 10, 0, 1].into()),
        hostname: Some("fuzz".into()),
    };
    let server = Server::new(lease, MAC, Some(1450));
    let _ = dhcp::is_server_reply(frame);
    if let Verdict::Reply(r) = server.handle(frame) {
        assert!(frame.len() >= 14 + 20 + 8 + 240, "answered a frame too short for DHCP");
        assert_eq!(&frame[6..12], &MAC[..], "answered a frame from another MAC");
        assert_eq!(&r[..6], &MAC[..], "a reply to another MAC");
        assert!(dhcp::is_server_reply(&r), "a reply that is not a DHCP server's");
        assert!(r.len() <= 1500 + 14, "a reply larger than a frame");
    }
});
