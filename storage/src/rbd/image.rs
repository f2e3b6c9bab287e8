//! RBD image management through librbd: create (optionally with its data on
//! an erasure-coded pool), resize, snapshots, clones, flatten, remove, list,
//! info, and the exclusive lock (owners, acquire, break).

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::ptr;

use serde::Serialize;

use crate::ceph::cluster::{cstring, IoCtx};
use crate::ceph::error::CephError;
use crate::ceph::ffi;

/// RBD feature bits (librbd's features.h).
pub mod features {
    pub const LAYERING: u64 = 1 << 0;
    pub const STRIPINGV2: u64 = 1 << 1;
    pub const EXCLUSIVE_LOCK: u64 = 1 << 2;
    pub const OBJECT_MAP: u64 = 1 << 3;
    pub const FAST_DIFF: u64 = 1 << 4;
    pub const DEEP_FLATTEN: u64 = 1 << 5;
    pub const DATA_POOL: u64 = 1 << 7;
    /// What VM disks get unless asked otherwise: clones, exclusive lock
    /// (fencing and migration hand-over), object map and fast diff.
    pub const VM_DEFAULT: u64 = LAYERING | EXCLUSIVE_LOCK | OBJECT_MAP | FAST_DIFF | DEEP_FLATTEN;
}

/// How a new image is laid out. `None` fields keep Ceph's defaults.
#[derive(Debug, Clone, Default)]
pub struct ImageOptions {
    pub features: Option<u64>,
    /// Object size as a power of two (22 = 4 MiB), 12..=26.
    pub order: Option<u8>,
    pub stripe_unit: Option<u64>,
    pub stripe_count: Option<u64>,
    /// Keep data objects in this (usually erasure-coded) pool; metadata
    /// stays in the image's own replicated pool.
    pub data_pool: Option<String>,
}

impl ImageOptions {
    fn validate(&self) -> Result<(), CephError> {
        if let Some(o) = self.order {
            if !(12..=26).contains(&o) {
                return Err(CephError::invalid(
                    "image order",
                    format!("{o} must be between 12 (4 KiB objects) and 26 (64 MiB)"),
                ));
            }
        }
        match (self.stripe_unit, self.stripe_count) {
            (Some(su), Some(sc)) => {
                let obj = 1u64 << self.order.unwrap_or(22);
                if su == 0 || sc == 0 || !obj.is_multiple_of(su) {
                    return Err(CephError::invalid(
                        "striping",
                        format!(
                            "stripe unit {su} must divide the object size {obj}, and count {sc} must be at least 1"
                        ),
                    ));
                }
            }
            (None, None) => {}
            _ => return Err(CephError::invalid("striping", "give both stripe_unit and stripe_count, or neither")),
        }
        if let Some(p) = &self.data_pool {
            crate::ceph::profiles::validate_name("data pool", p)?;
        }
        Ok(())
    }

    /// Builds librbd's option set; destroyed when the guard drops.
    fn to_rbd(&self) -> Result<OptsGuard, CephError> {
        self.validate()?;
        let mut o: ffi::rbd_image_options_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; destroyed by OptsGuard.
        unsafe { ffi::rbd_image_options_create(&mut o) };
        let g = OptsGuard(o);
        let set_u64 = |k: c_int, v: u64, what: &str| -> Result<(), CephError> {
            // SAFETY: valid option set; known option key.
            let r = unsafe { ffi::rbd_image_options_set_uint64(g.0, k, v) };
            if r < 0 {
                Err(CephError::call(format!("image option {what}"), i64::from(r)))
            } else {
                Ok(())
            }
        };
        if let Some(f) = self.features {
            set_u64(ffi::RBD_IMAGE_OPTION_FEATURES, f, "features")?;
        }
        if let Some(order) = self.order {
            set_u64(ffi::RBD_IMAGE_OPTION_ORDER, u64::from(order), "order")?;
        }
        if let (Some(su), Some(sc)) = (self.stripe_unit, self.stripe_count) {
            set_u64(ffi::RBD_IMAGE_OPTION_STRIPE_UNIT, su, "stripe_unit")?;
            set_u64(ffi::RBD_IMAGE_OPTION_STRIPE_COUNT, sc, "stripe_count")?;
        }
        if let Some(p) = &self.data_pool {
            let c = cstring("data pool", p)?;
            // SAFETY: valid option set; librbd copies the string.
            let r = unsafe { ffi::rbd_image_options_set_string(g.0, ffi::RBD_IMAGE_OPTION_DATA_POOL, c.as_ptr()) };
            if r < 0 {
                return Err(CephError::call("image option data_pool", i64::from(r)));
            }
        }
        Ok(g)
    }
}

struct OptsGuard(ffi::rbd_image_options_t);

impl Drop for OptsGuard {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { ffi::rbd_image_options_destroy(self.0) }
    }
}

pub(crate) fn check(op: impl FnOnce() -> String, ret: c_int) -> Result<(), CephError> {
    if ret < 0 {
        Err(CephError::call(op(), i64::from(ret)))
    } else {
        Ok(())
    }
}

pub fn validate_image_name(name: &str) -> Result<(), CephError> {
    let ok = !name.is_empty()
        && name.len() < ffi::RBD_MAX_IMAGE_NAME_SIZE
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@');
    if ok {
        Ok(())
    } else {
        Err(CephError::invalid(
            "image name",
            format!("{name:?} must be 1-95 printable characters without '/', '@' or spaces"),
        ))
    }
}

pub fn create(io: &IoCtx, name: &str, size: u64, opts: &ImageOptions) -> Result<(), CephError> {
    validate_image_name(name)?;
    if size == 0 {
        return Err(CephError::invalid("image size", "must be more than 0 bytes"));
    }
    let o = opts.to_rbd()?;
    let n = cstring("image name", name)?;
    // SAFETY: open ioctx, NUL-terminated name, valid option set.
    check(|| format!("create image {}/{name}", io.pool()), unsafe { ffi::rbd_create4(io.h.io, n.as_ptr(), size, o.0) })
}

/// Clones a protected snapshot of a golden image (copy-on-write).
pub fn clone(
    parent: &IoCtx,
    parent_name: &str,
    snap: &str,
    child_io: &IoCtx,
    child: &str,
    opts: &ImageOptions,
) -> Result<(), CephError> {
    validate_image_name(parent_name)?;
    validate_image_name(child)?;
    validate_image_name(snap)?;
    let o = opts.to_rbd()?;
    let (p, s, c) = (cstring("image", parent_name)?, cstring("snapshot", snap)?, cstring("image", child)?);
    // SAFETY: open ioctxs, NUL-terminated names, valid option set.
    let r = unsafe { ffi::rbd_clone3(parent.h.io, p.as_ptr(), s.as_ptr(), child_io.h.io, c.as_ptr(), o.0) };
    check(|| format!("clone {}/{parent_name}@{snap} to {}/{child}", parent.pool(), child_io.pool()), r)
}

pub fn remove(io: &IoCtx, name: &str) -> Result<(), CephError> {
    validate_image_name(name)?;
    let n = cstring("image name", name)?;
    // SAFETY: open ioctx and NUL-terminated name.
    check(|| format!("remove image {}/{name}", io.pool()), unsafe { ffi::rbd_remove(io.h.io, n.as_ptr()) })
}

pub fn list(io: &IoCtx) -> Result<Vec<String>, CephError> {
    let mut cap = 64usize;
    loop {
        let mut specs: Vec<ffi::rbd_image_spec_t> = Vec::with_capacity(cap);
        let mut n = cap;
        // SAFETY: buffer of `cap` specs; librbd writes at most `n` and sets n.
        let r = unsafe { ffi::rbd_list2(io.h.io, specs.as_mut_ptr(), &mut n) };
        if r == -libc::ERANGE {
            cap = n.max(cap * 2);
            continue;
        }
        check(|| format!("list images in {}", io.pool()), r)?;
        // SAFETY: librbd initialised the first n entries.
        unsafe { specs.set_len(n) };
        let names = specs
            .iter()
            // SAFETY: each name is a NUL-terminated string owned by librbd until cleanup.
            .map(|s| unsafe { CStr::from_ptr(s.name) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees the strings librbd allocated for these n entries.
        unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
        return Ok(names);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageInfo {
    pub size: u64,
    pub object_size: u64,
    pub objects: u64,
    pub order: i32,
    pub features: u64,
    /// Pool id of the data pool, when data lives apart from metadata.
    pub data_pool_id: Option<i64>,
    pub stripe_unit: u64,
    pub stripe_count: u64,
}

/// An open image.
pub struct Image {
    pub(crate) h: ffi::rbd_image_t,
    io: IoCtx,
    name: String,
}

// SAFETY: librbd image handles are thread-safe (ImageCtx has its own locks);
// Basalt uses each from one thread at a time anyway.
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open, closed once; librbd waits for in-flight I/O.
        unsafe { ffi::rbd_close(self.h) };
    }
}

impl Image {
    pub fn open(io: &IoCtx, name: &str) -> Result<Image, CephError> {
        validate_image_name(name)?;
        let n = cstring("image name", name)?;
        let mut h: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: open ioctx, name, out-pointer; NULL snapshot = the head.
        check(|| format!("open image {}/{name}", io.pool()), unsafe {
            ffi::rbd_open(io.h.io, n.as_ptr(), &mut h, ptr::null())
        })?;
        Ok(Image { h, io: io.clone(), name: name.into() })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn op(&self, what: &str) -> String {
        format!("{what} {}/{}", self.io.pool(), self.name)
    }

    pub fn info(&self) -> Result<ImageInfo, CephError> {
        let mut i = std::mem::MaybeUninit::<ffi::rbd_image_info_t>::zeroed();
        // SAFETY: open image; buffer of the C struct's size.
        check(|| self.op("stat"), unsafe {
            ffi::rbd_stat(self.h, i.as_mut_ptr(), std::mem::size_of::<ffi::rbd_image_info_t>())
        })?;
        // SAFETY: rbd_stat filled it (and it was zeroed before).
        let i = unsafe { i.assume_init() };
        let (mut features, mut su, mut sc) = (0u64, 0u64, 0u64);
        // SAFETY: open image; out-pointers to locals.
        check(|| self.op("get features of"), unsafe { ffi::rbd_get_features(self.h, &mut features) })?;
        // SAFETY: as above.
        check(|| self.op("get stripe unit of"), unsafe { ffi::rbd_get_stripe_unit(self.h, &mut su) })?;
        // SAFETY: as above.
        check(|| self.op("get stripe count of"), unsafe { ffi::rbd_get_stripe_count(self.h, &mut sc) })?;
        // SAFETY: open image.
        let dp = unsafe { ffi::rbd_get_data_pool_id(self.h) };
        Ok(ImageInfo {
            size: i.size,
            object_size: i.obj_size,
            objects: i.num_objs,
            order: i.order,
            features,
            data_pool_id: (features & features::DATA_POOL != 0).then_some(dp),
            stripe_unit: su,
            stripe_count: sc,
        })
    }

    pub fn size(&self) -> Result<u64, CephError> {
        let mut s = 0u64;
        // SAFETY: open image; out-pointer to a local.
        check(|| self.op("get size of"), unsafe { ffi::rbd_get_size(self.h, &mut s) })?;
        Ok(s)
    }

    pub fn resize(&self, size: u64) -> Result<(), CephError> {
        if size == 0 {
            return Err(CephError::invalid("image size", "must be more than 0 bytes"));
        }
        // SAFETY: open image.
        check(|| self.op("resize"), unsafe { ffi::rbd_resize(self.h, size) })
    }

    pub fn flatten(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check(|| self.op("flatten"), unsafe { ffi::rbd_flatten(self.h) })
    }

    fn snap_call(
        &self,
        what: &str,
        snap: &str,
        f: unsafe extern "C" fn(ffi::rbd_image_t, *const c_char) -> c_int,
    ) -> Result<(), CephError> {
        validate_image_name(snap)?;
        let s = cstring("snapshot", snap)?;
        // SAFETY: open image and NUL-terminated snapshot name; `f` is one of
        // librbd's snapshot calls with this signature.
        check(|| format!("{what} {}/{}@{snap}", self.io.pool(), self.name), unsafe { f(self.h, s.as_ptr()) })
    }

    pub fn snap_create(&self, snap: &str) -> Result<(), CephError> {
        self.snap_call("create snapshot", snap, ffi::rbd_snap_create)
    }
    pub fn snap_remove(&self, snap: &str) -> Result<(), CephError> {
        self.snap_call("remove snapshot", snap, ffi::rbd_snap_remove)
    }
    pub fn snap_protect(&self, snap: &str) -> Result<(), CephError> {
        self.snap_call("protect snapshot", snap, ffi::rbd_snap_protect)
    }
    pub fn snap_unprotect(&self, snap: &str) -> Result<(), CephError> {
        self.snap_call("unprotect snapshot", snap, ffi::rbd_snap_unprotect)
    }
    pub fn snap_is_protected(&self, snap: &str) -> Result<bool, CephError> {
        validate_image_name(snap)?;
        let s = cstring("snapshot", snap)?;
        let mut p: c_int = 0;
        // SAFETY: open image, name, out-pointer.
        check(|| self.op("query snapshot of"), unsafe { ffi::rbd_snap_is_protected(self.h, s.as_ptr(), &mut p) })?;
        Ok(p != 0)
    }

    /// Takes the exclusive lock and keeps it: other clients' writes fail
    /// (-EROFS) instead of taking it over, until this client releases it or
    /// is fenced and its lock broken.
    pub fn lock_exclusive(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check(|| self.op("acquire exclusive lock on"), unsafe {
            ffi::rbd_lock_acquire(self.h, ffi::RBD_LOCK_MODE_EXCLUSIVE)
        })
    }

    /// Waits until every write issued so far is stable in the cluster.
    pub fn flush(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check(|| self.op("flush"), unsafe { ffi::rbd_flush(self.h) })
    }

    pub fn lock_release(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check(|| self.op("release lock on"), unsafe { ffi::rbd_lock_release(self.h) })
    }

    pub fn is_lock_owner(&self) -> Result<bool, CephError> {
        let mut o: c_int = 0;
        // SAFETY: open image; out-pointer.
        check(|| self.op("query lock of"), unsafe { ffi::rbd_is_exclusive_lock_owner(self.h, &mut o) })?;
        Ok(o != 0)
    }

    /// Clients holding the exclusive lock (`client.4242`).
    pub fn lock_owners(&self) -> Result<Vec<String>, CephError> {
        let mut mode: c_int = 0;
        let mut owners: [*mut c_char; 8] = [ptr::null_mut(); 8];
        let mut n = owners.len();
        // SAFETY: array of 8 pointers; librbd fills n of them and sets n.
        let r = unsafe { ffi::rbd_lock_get_owners(self.h, &mut mode, owners.as_mut_ptr(), &mut n) };
        if r == -libc::ENOENT {
            return Ok(Vec::new());
        }
        check(|| self.op("list lock owners of"), r)?;
        let v = owners[..n]
            .iter()
            // SAFETY: librbd set n NUL-terminated strings, freed below.
            .map(|p| unsafe { CStr::from_ptr(*p) }.to_string_lossy().into_owned())
            .collect();
        // SAFETY: frees the n strings librbd allocated.
        unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), n) };
        Ok(v)
    }

    /// Breaks another client's exclusive lock. librbd blocklists the old
    /// owner first (rbd_blocklist_on_break_lock), so it cannot write again.
    pub fn break_lock(&self, owner: &str) -> Result<(), CephError> {
        let o = cstring("lock owner", owner)?;
        // SAFETY: open image; NUL-terminated owner string.
        check(|| self.op(&format!("break lock of {owner} on")), unsafe {
            ffi::rbd_lock_break(self.h, ffi::RBD_LOCK_MODE_EXCLUSIVE, o.as_ptr())
        })
    }

    /// Synchronous read, for tools and tests (VMs use [`super::RbdBackend`]).
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, CephError> {
        let mut buf = vec![0u8; len];
        // SAFETY: buffer of `len` bytes, written by librbd.
        let r = unsafe { ffi::rbd_read(self.h, offset, len, buf.as_mut_ptr() as *mut c_char) };
        if r < 0 {
            return Err(CephError::call(self.op("read"), r as i64));
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), CephError> {
        // SAFETY: buffer of data.len() bytes, only read by librbd.
        let r = unsafe { ffi::rbd_write(self.h, offset, data.len(), data.as_ptr() as *const c_char) };
        if r < 0 {
            return Err(CephError::call(self.op("write"), r as i64));
        }
        if r as usize != data.len() {
            return Err(CephError::Reply {
                op: self.op("write"),
                detail: format!("short write {r} of {}", data.len()),
            });
        }
        Ok(())
    }
}
