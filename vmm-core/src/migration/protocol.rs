//! The live-migration wire protocol: plain messages over one byte stream
//! (TCP today; anything `Read + Write`, so TLS can wrap it unchanged).
//!
//! ```text
//! stream   = MAGIC message*
//! message  = len:u32le json[len] payload
//! ```
//! `json` is one [`Message`]. Only [`Message::Pages`] has a payload: the
//! bytes of its non-zero ranges, in table order, `pages * page_size` each.
//! Everything is checked on the way in: the magic, the length (at most
//! [`MAX_JSON`]), the JSON, and every page range against guest RAM, so a
//! peer that sends garbage or stops half-way gets a clear error, never a
//! write outside RAM.
//!
//! A conversation (S = sender, R = receiver):
//! ```text
//! S: Hello{offer}          R: Accept | Refuse{reason}     (before any guest byte)
//! S: Pages{round,ranges}*  (pre-copy rounds, then the final dirty set)
//! S: State{state}  S: Complete{...}
//! R: Resumed{restore_ms}   (the guest runs on R)  | Abandon{reason}
//! S: Done{report}          (best effort: R keeps it for migrate-status)
//! ```
//! Either side may send `Abandon{reason}` at any point before `Resumed`.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::compat::Offer;
use super::Report;
use crate::persist::VmState;

/// Versions this VMM speaks; a sender offers its range, the receiver picks.
/// 2: `resumed` may carry the receiver's restore time.
pub const PROTOCOL_VERSION: u32 = 2;
pub const MIN_PROTOCOL_VERSION: u32 = 1;
pub const MAGIC: [u8; 8] = *b"BSLTMIG\n";
/// Largest JSON message (the VM state of a big VM is well below this).
pub const MAX_JSON: u32 = 16 << 20;
/// Most pages one `Pages` message may carry (64 MiB of 4 KiB pages).
pub const MAX_PAGES_PER_MESSAGE: u64 = 16384;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageRange {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    pub pages: u32,
    /// The pages are all zeroes: no bytes follow for them.
    #[serde(default)]
    pub zero: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Hello {
        min_version: u32,
        max_version: u32,
        offer: Box<Offer>,
    },
    Accept {
        version: u32,
    },
    Refuse {
        reason: String,
    },
    Pages {
        round: u32,
        ranges: Vec<PageRange>,
    },
    State {
        state: Box<VmState>,
    },
    /// Everything is sent; the sender has released its disks.
    Complete,
    Resumed {
        /// From the state's arrival to the guest running (version 2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restore_ms: Option<u64>,
    },
    Abandon {
        reason: String,
    },
    Done {
        report: Box<Report>,
    },
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Accept { .. } => "accept",
            Message::Refuse { .. } => "refuse",
            Message::Pages { .. } => "pages",
            Message::State { .. } => "state",
            Message::Complete => "complete",
            Message::Resumed { .. } => "resumed",
            Message::Abandon { .. } => "abandon",
            Message::Done { .. } => "done",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the migration stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer is not a basalt-vmm migration stream (bad magic {0:02x?})")]
    Magic([u8; 8]),
    #[error("message of {0} bytes is larger than the {MAX_JSON}-byte limit")]
    TooLarge(u32),
    #[error("malformed message: {0}")]
    Json(String),
    #[error("bad page table: {0}")]
    Pages(String),
    #[error("the peer abandoned the migration: {0}")]
    Abandoned(String),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: &'static str },
}

pub fn write_magic(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&MAGIC)
}

pub fn read_magic(r: &mut impl Read) -> Result<(), ProtocolError> {
    let mut m = [0u8; 8];
    r.read_exact(&mut m)?;
    if m != MAGIC {
        return Err(ProtocolError::Magic(m));
    }
    Ok(())
}

pub fn send(w: &mut impl Write, m: &Message) -> Result<(), ProtocolError> {
    let json = serde_json::to_vec(m).map_err(|e| ProtocolError::Json(e.to_string()))?;
    let len = u32::try_from(json.len()).ok().filter(|&l| l <= MAX_JSON).ok_or(ProtocolError::TooLarge(u32::MAX))?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(&json)?;
    Ok(())
}

pub fn recv(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_JSON {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    serde_json::from_slice(&buf).map_err(|e| ProtocolError::Json(e.to_string()))
}

/// Checks a page table against guest RAM (`[ram_base, ram_base + ram_len)`):
/// page-aligned, inside RAM, not too many pages. Returns the number of bytes
/// of payload that follow it.
pub fn check_ranges(ranges: &[PageRange], page: u64, ram_base: u64, ram_len: u64) -> Result<u64, ProtocolError> {
    let bad = |m: String| Err(ProtocolError::Pages(m));
    let mut pages = 0u64;
    let mut payload = 0u64;
    for r in ranges {
        if r.gpa % page != 0 || r.pages == 0 {
            return bad(format!("range {:#x}+{} pages is not page-aligned or empty", r.gpa, r.pages));
        }
        let len = u64::from(r.pages) * page;
        let inside = r.gpa >= ram_base && r.gpa.checked_add(len).is_some_and(|end| end <= ram_base + ram_len);
        if !inside {
            return bad(format!("range {:#x}+{len:#x} is outside guest RAM", r.gpa));
        }
        pages += u64::from(r.pages);
        if !r.zero {
            payload += len;
        }
    }
    if pages > MAX_PAGES_PER_MESSAGE {
        return bad(format!("{pages} pages in one message; at most {MAX_PAGES_PER_MESSAGE}"));
    }
    Ok(payload)
}

/// Reads the next message and insists on one kind; an `Abandon` is turned
/// into its reason.
pub fn expect(r: &mut impl Read, expected: &'static str) -> Result<Message, ProtocolError> {
    match recv(r)? {
        Message::Abandon { reason } => Err(ProtocolError::Abandoned(reason)),
        m if m.name() == expected => Ok(m),
        m => Err(ProtocolError::Unexpected { expected, got: m.name() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_refused() {
        let mut buf = Vec::new();
        write_magic(&mut buf).expect("magic");
        let pages = Message::Pages { round: 3, ranges: vec![PageRange { gpa: 0x4000_0000, pages: 2, zero: false }] };
        send(&mut buf, &pages).expect("send");
        send(&mut buf, &Message::Abandon { reason: "cancelled".into() }).expect("send");
        let mut r = &buf[..];
        read_magic(&mut r).expect("magic back");
        assert_eq!(recv(&mut r).expect("pages"), pages);
        let e = expect(&mut r, "complete").unwrap_err();
        assert!(e.to_string().contains("abandoned the migration: cancelled"), "{e}");
        assert!(matches!(recv(&mut r), Err(ProtocolError::Io(_))), "a truncated stream is an I/O error");

        let mut junk = &b"GET / HTTP/1.1\r\n"[..];
        assert!(read_magic(&mut junk).unwrap_err().to_string().contains("not a basalt-vmm migration stream"));
        let mut huge = &u32::MAX.to_le_bytes()[..];
        assert!(matches!(recv(&mut huge), Err(ProtocolError::TooLarge(_))));
        let mut bad = Vec::new();
        bad.extend_from_slice(&5u32.to_le_bytes());
        bad.extend_from_slice(b"{nope");
        assert!(matches!(recv(&mut &bad[..]), Err(ProtocolError::Json(_))));
        let mut unknown = Vec::new();
        let j = br#"{"msg":"pages","round":1,"ranges":[],"extra":1}"#;
        unknown.extend_from_slice(&(j.len() as u32).to_le_bytes());
        unknown.extend_from_slice(j);
        assert!(matches!(recv(&mut &unknown[..]), Err(ProtocolError::Json(_))), "unknown fields are refused");
    }

    #[test]
    fn resumed_reads_with_and_without_the_restore_time() {
        // A version 1 receiver's `resumed` carries no time; version 2's does.
        let v1 = br#"{"msg":"resumed"}"#;
        let mut buf = (v1.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(v1);
        assert_eq!(recv(&mut &buf[..]).expect("v1"), Message::Resumed { restore_ms: None });
        let mut buf = Vec::new();
        send(&mut buf, &Message::Resumed { restore_ms: Some(21) }).expect("send");
        assert_eq!(recv(&mut &buf[..]).expect("v2"), Message::Resumed { restore_ms: Some(21) });
    }

    #[test]
    fn page_tables_must_stay_inside_guest_ram() {
        let (base, len, page) = (0x4000_0000u64, 64u64 << 20, 4096u64);
        let ok = [PageRange { gpa: base, pages: 4, zero: false }, PageRange { gpa: base + 8192, pages: 8, zero: true }];
        assert_eq!(check_ranges(&ok, page, base, len).expect("valid"), 4 * 4096);
        let cases = [
            PageRange { gpa: base + 1, pages: 1, zero: false },
            PageRange { gpa: base - 4096, pages: 1, zero: false },
            PageRange { gpa: base + len - 4096, pages: 2, zero: false },
            PageRange { gpa: u64::MAX - 4095, pages: 1, zero: false },
            PageRange { gpa: base, pages: 0, zero: false },
        ];
        for c in cases {
            assert!(check_ranges(&[c], page, base, len).is_err(), "{c:?} must be refused");
        }
        let many = [PageRange { gpa: base, pages: MAX_PAGES_PER_MESSAGE as u32 + 1, zero: true }];
        assert!(check_ranges(&many, page, base, 1 << 30).is_err());
    }
}
