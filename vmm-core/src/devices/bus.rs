//! The MMIO bus: which device answers a guest access at a given address.
//! vCPU threads dispatch their MMIO exits here.

use std::sync::{Arc, Mutex};

pub trait MmioDevice: Send {
    /// `offset` is relative to the device's base; `data.len()` is the access width.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MMIO range {base:#x}+{len:#x} overlaps a device already on the bus")]
pub struct Overlap {
    pub base: u64,
    pub len: u64,
}

type Slot = (u64, u64, Arc<Mutex<dyn MmioDevice>>);

#[derive(Default, Clone)]
pub struct MmioBus {
    devices: Vec<Slot>,
}

impl MmioBus {
    pub fn insert(&mut self, base: u64, len: u64, dev: Arc<Mutex<dyn MmioDevice>>) -> Result<(), Overlap> {
        let end = base.checked_add(len).ok_or(Overlap { base, len })?;
        if len == 0 || self.devices.iter().any(|(b, l, _)| base < b + l && *b < end) {
            return Err(Overlap { base, len });
        }
        self.devices.push((base, len, dev));
        self.devices.sort_by_key(|(b, ..)| *b);
        Ok(())
    }

    fn find(&self, addr: u64, width: usize) -> Option<(u64, &Arc<Mutex<dyn MmioDevice>>)> {
        let i = self.devices.partition_point(|(b, ..)| *b <= addr).checked_sub(1)?;
        let (base, len, dev) = &self.devices[i];
        let off = addr - base;
        // The whole access must fall inside the window.
        (off.checked_add(width as u64)? <= *len).then_some((off, dev))
    }

    /// Returns false when no device claims the address (the caller decides
    /// what the guest sees: reads return zeroes).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl MmioDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_by_range_refuses_overlaps_and_straddling_accesses() {
        let mut bus = MmioBus::default();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Reg(1)))).expect("insert");
        bus.insert(0x2000, 0x100, Arc::new(Mutex::new(Reg(5)))).expect("insert");
        assert!(bus.insert(0x10f0, 0x20, Arc::new(Mutex::new(Reg(0)))).is_err());
        assert!(bus.insert(u64::MAX - 1, 4, Arc::new(Mutex::new(Reg(0)))).is_err());
        let mut b = [0u8; 1];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b[0], 5);
        assert!(bus.write(0x2000, &[9]));
        assert!(bus.read(0x2000, &mut b));
        assert_eq!(b[0], 9);
        let mut w = [0u8; 4];
        assert!(!bus.read(0x10fe, &mut w), "straddles the end of the window");
        assert!(!bus.read(0x3000, &mut b));
        assert!(!bus.read(0x0, &mut b));
    }
}
