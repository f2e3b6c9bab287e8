//! Which guest pages changed: KVM's dirty log for the guest's own writes,
//! OR the bitmap vm-memory keeps of the VMM's writes (virtio data, status
//! bytes, used rings), which KVM never sees.
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 a harvest reads the log without
//! write-protecting the whole slot again, then re-protects (KVM_CLEAR_DIRTY_LOG)
//! only the pages it found dirty, which is what makes a round cheap when few
//! pages change. Without it, KVM_GET_DIRTY_LOG re-protects everything itself.

use std::sync::Arc;

use kvm_bindings::{kvm_clear_dirty_log, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use crate::memory::{GuestRam, MemSlot};
use vm_memory::mmap::MmapRegion;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
/// KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, the first flag of the capability.
const MANUAL_PROTECT_ENABLE: u64 = 1;

/// One bit per page of guest RAM, from `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
    base: u64,
    page: u64,
}

impl DirtyBitmap {
    pub fn new(base: u64, bytes: u64, page: u64) -> Self {
        let pages = bytes / page;
        DirtyBitmap { words: vec![0; pages.div_ceil(64) as usize], pages, base, page }
    }

    /// Every page set: the first pass.
    pub fn all(base: u64, bytes: u64, page: u64) -> Self {
        let mut b = Self::new(base, bytes, page);
        b.words.fill(u64::MAX);
        if b.pages % 64 != 0 {
            if let Some(last) = b.words.last_mut() {
                *last = (1u64 << (b.pages % 64)) - 1;
            }
        }
        b
    }

    pub fn page_size(&self) -> u64 {
        self.page
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// ORs in a bitmap of pages starting at page `first` (KVM's per-slot
    /// log, vm-memory's per-region one).
    pub fn or_at(&mut self, first: u64, words: &[u64]) {
        if first % 64 == 0 {
            let at = (first / 64) as usize;
            for (dst, src) in self.words.iter_mut().skip(at).zip(words) {
                *dst |= src;
            }
        } else {
            for (i, w) in words.iter().enumerate() {
                let mut w = *w;
                while w != 0 {
                    let b = u64::from(w.trailing_zeros());
                    self.set(first + i as u64 * 64 + b);
                    w &= w - 1;
                }
            }
        }
        if self.pages % 64 != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
    }

    pub fn merge(&mut self, other: &DirtyBitmap) {
        self.or_at(0, &other.words);
    }

    /// Runs of dirty pages as (guest address, pages), in address order,
    /// none longer than `max_pages`.
    pub fn runs(&self, max_pages: u32) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        let mut start: Option<(u64, u32)> = None;
        let mut p = 0u64;
        while p < self.pages {
            // Whole clean words at once: most of RAM, in every round but the first.
            if p % 64 == 0 && self.words[(p / 64) as usize] == 0 {
                if let Some(r) = start.take() {
                    out.push(r);
                }
                p += 64;
                continue;
            }
            let dirty = self.words[(p / 64) as usize] & (1 << (p % 64)) != 0;
            match (&mut start, dirty) {
                (Some((_, n)), true) if *n < max_pages => *n += 1,
                (s, true) => {
                    if let Some(r) = s.take() {
                        out.push(r);
                    }
                    *s = Some((self.base + p * self.page, 1));
                }
                (s, false) => {
                    if let Some(r) = s.take() {
                        out.push(r);
                    }
                }
            }
            p += 1;
        }
        out.extend(start);
        out
    }
}

/// Takes the VMM's own writes out of guest RAM's bitmaps.
pub fn take_vmm_writes(mem: &GuestRam, into: &mut DirtyBitmap) {
    for r in mem.iter() {
        let first = (r.start_addr().0 - into.base) / into.page;
        into.or_at(first, &MmapRegion::bitmap(&**r).get_and_reset());
    }
}

/// KVM's side of the dirty log, for every memory slot of a VM.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Vec<MemSlot>,
    manual: bool,
    on: bool,
}

impl KvmDirtyLog {
    pub fn new(vm: Arc<VmFd>, slots: Vec<MemSlot>) -> Self {
        KvmDirtyLog { vm, slots, manual: false, on: false }
    }

    /// Turns logging on (write-protecting every page once) and forgets the
    /// VMM's earlier writes: from here on, every write is seen.
    pub fn start(&mut self, mem: &GuestRam) -> Result<(), String> {
        let supported = self.vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as _);
        self.manual = false;
        if supported as u64 & MANUAL_PROTECT_ENABLE != 0 {
            let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
            cap.args[0] = MANUAL_PROTECT_ENABLE;
            self.manual = self.vm.enable_cap(&cap).is_ok();
        }
        crate::memory::set_dirty_logging(&self.vm, &self.slots, true)
            .map_err(|e| format!("start KVM's dirty log: {e}"))?;
        self.on = true;
        for r in mem.iter() {
            MmapRegion::bitmap(&**r).reset();
        }
        log::info!("dirty log on ({} protect)", if self.manual { "manual" } else { "automatic" });
        Ok(())
    }

    pub fn manual_protect(&self) -> bool {
        self.manual
    }

    /// ORs every page the guest wrote since the last harvest into `into`,
    /// and re-arms their tracking.
    pub fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<(), String> {
        for s in &self.slots {
            let words = self
                .vm
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(|e| format!("KVM_GET_DIRTY_LOG slot {}: {e}", s.slot))?;
            if self.manual {
                let clear = kvm_clear_dirty_log {
                    slot: s.slot,
                    num_pages: (s.size / into.page) as u32,
                    first_page: 0,
                    __bindgen_anon_1: kvm_bindings::kvm_clear_dirty_log__bindgen_ty_1 {
                        dirty_bitmap: words.as_ptr() as *mut libc::c_void,
                    },
                };
                // SAFETY: a VM fd; `clear` names a whole slot of this VM and
                // points at a bitmap of one bit per page of it, alive for the call.
                let r = unsafe { ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
                if r < 0 {
                    return Err(format!("KVM_CLEAR_DIRTY_LOG slot {}: {}", s.slot, std::io::Error::last_os_error()));
                }
            }
            into.or_at((s.guest_addr - into.base) / into.page, &words);
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if self.on {
            if let Err(e) = crate::memory::set_dirty_logging(&self.vm, &self.slots, false) {
                log::warn!("stop KVM's dirty log: {e}");
            }
            self.on = false;
        }
    }
}

impl Drop for KvmDirtyLog {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_merge_and_coalesce_into_runs() {
        let base = 0x4000_0000;
        let mut b = DirtyBitmap::new(base, 200 * 4096, 4096);
        assert_eq!(b.count(), 0);
        b.or_at(0, &[0b1110]);
        b.or_at(130, &[0b11]); // not on a word boundary
        b.set(199);
        b.set(200); // past the end: ignored
        assert_eq!(b.count(), 6);
        assert_eq!(b.runs(1024), vec![(base + 4096, 3), (base + 130 * 4096, 2), (base + 199 * 4096, 1)]);
        assert_eq!(
            b.runs(2),
            vec![(base + 4096, 2), (base + 3 * 4096, 1), (base + 130 * 4096, 2), (base + 199 * 4096, 1)]
        );
        let all = DirtyBitmap::all(base, 200 * 4096, 4096);
        assert_eq!(all.count(), 200);
        let mut m = DirtyBitmap::new(base, 200 * 4096, 4096);
        m.merge(&all);
        assert_eq!(m.runs(1024), vec![(base, 200)]);
        m.or_at(150, &[u64::MAX]); // bits past the end are dropped
        assert_eq!(m.count(), 200);
    }

    #[test]
    fn the_vmms_own_writes_are_tracked() {
        use vm_memory::{Bytes, GuestAddress};
        let base = 0x4000_0000;
        let mem = GuestRam::from_ranges(&[(GuestAddress(base), 64 * 4096)]).expect("mem");
        mem.write_slice(&[1; 10], GuestAddress(base + 5 * 4096 + 4090)).expect("write across a page boundary");
        let mut b = DirtyBitmap::new(base, 64 * 4096, 4096);
        take_vmm_writes(&mem, &mut b);
        assert_eq!(b.runs(64), vec![(base + 5 * 4096, 2)]);
        let mut again = DirtyBitmap::new(base, 64 * 4096, 4096);
        take_vmm_writes(&mem, &mut again);
        assert_eq!(again.count(), 0, "taking the writes forgets them");
    }
}
