//! A connection to a Ceph cluster through librados, like every Ceph client:
//! a ceph.conf (`--conf`, or `CEPH_CONF`), a client id and keyring, and
//! `CEPH_ARGS` for extra options.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::CephError;
use super::ffi;

/// How to reach the cluster and as whom.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// ceph.conf; `None` lets librados search (`$CEPH_CONF`, /etc/ceph/ceph.conf).
    pub conf: Option<PathBuf>,
    /// Client id without the `client.` prefix (`admin`, `vm`).
    pub id: String,
    /// Keyring file; `None` uses the conf's `keyring` setting.
    pub keyring: Option<PathBuf>,
    /// Extra options, applied after the conf file and `CEPH_ARGS`.
    pub options: Vec<(String, String)>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig { conf: None, id: "admin".into(), keyring: None, options: Vec::new() }
    }
}

impl ClientConfig {
    pub fn with_id(id: &str) -> Self {
        ClientConfig { id: id.into(), ..Default::default() }
    }
    pub fn option(mut self, key: &str, value: &str) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }
}

struct Handle(ffi::rados_t);

// SAFETY: a rados_t is documented thread-safe once connected; all access
// goes through librados's own locking.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and is shut down once,
        // after every IoCtx (which holds an Arc to it) is gone.
        unsafe { ffi::rados_shutdown(self.0) }
    }
}

/// A connected cluster handle; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    h: Arc<Handle>,
}

/// A monitor's answer: the data (often JSON) and its status text.
#[derive(Debug)]
pub struct MonReply {
    pub out: Vec<u8>,
    pub status: String,
}

pub(crate) fn cstring(what: &str, s: &str) -> Result<CString, CephError> {
    CString::new(s).map_err(|_| CephError::invalid(what, format!("{s:?} contains a NUL byte")))
}

fn check(op: &str, ret: i32) -> Result<(), CephError> {
    if ret < 0 {
        Err(CephError::call(op, i64::from(ret)))
    } else {
        Ok(())
    }
}

impl Cluster {
    pub fn connect(cfg: &ClientConfig) -> Result<Cluster, CephError> {
        let name = cstring("client id", &format!("client.{}", cfg.id))?;
        let cluster_name = cstring("cluster name", "ceph")?;
        let mut raw: ffi::rados_t = ptr::null_mut();
        // SAFETY: out-pointer to a local; strings outlive the call.
        check("rados_create2", unsafe { ffi::rados_create2(&mut raw, cluster_name.as_ptr(), name.as_ptr(), 0) })?;
        let h = Handle(raw);
        let conf = cfg.conf.as_ref().map(|p| cstring("conf path", &p.to_string_lossy())).transpose()?;
        // SAFETY: valid handle; a NULL path asks librados to search the defaults.
        let ret = unsafe { ffi::rados_conf_read_file(h.0, conf.as_ref().map_or(ptr::null(), |c| c.as_ptr())) };
        check(
            &format!(
                "read ceph.conf {}",
                cfg.conf.as_ref().map_or("(default search)".into(), |p| p.display().to_string())
            ),
            ret,
        )?;
        // SAFETY: valid handle; NULL means the CEPH_ARGS variable.
        check("parse CEPH_ARGS", unsafe { ffi::rados_conf_parse_env(h.0, ptr::null()) })?;
        let mut opts = cfg.options.clone();
        if let Some(k) = &cfg.keyring {
            opts.push(("keyring".into(), k.to_string_lossy().into_owned()));
        }
        for (k, v) in &opts {
            let (ck, cv) = (cstring("option", k)?, cstring("option value", v)?);
            // SAFETY: valid handle and NUL-terminated strings.
            check(&format!("set option {k}={v}"), unsafe { ffi::rados_conf_set(h.0, ck.as_ptr(), cv.as_ptr()) })?;
        }
        // SAFETY: configured handle, connected once.
        check(&format!("connect as client.{}", cfg.id), unsafe { ffi::rados_connect(h.0) })?;
        Ok(Cluster { h: Arc::new(h) })
    }

    /// Sends one monitor command. JSON field types are strict in Ceph:
    /// integers as numbers, strings as strings, booleans as booleans.
    pub fn mon_command(&self, cmd: &Value) -> Result<MonReply, CephError> {
        let text = cmd.to_string();
        let op = cmd.get("prefix").and_then(Value::as_str).unwrap_or("mon command").to_string();
        let c = cstring("command", &text)?;
        let mut cmds = [c.as_ptr()];
        let (mut outbuf, mut outbuflen, mut outs, mut outslen) =
            (ptr::null_mut::<c_char>(), 0usize, ptr::null_mut::<c_char>(), 0usize);
        // SAFETY: one valid command string; out-pointers to locals; the
        // returned buffers are copied then freed with rados_buffer_free.
        let ret = unsafe {
            ffi::rados_mon_command(
                self.h.0,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut outbuf,
                &mut outbuflen,
                &mut outs,
                &mut outslen,
            )
        };
        // SAFETY: librados returns (ptr, len) pairs it allocated, or NULL.
        let take = |p: *mut c_char, len: usize| unsafe {
            if p.is_null() {
                Vec::new()
            } else {
                let v = std::slice::from_raw_parts(p as *const u8, len).to_vec();
                ffi::rados_buffer_free(p);
                v
            }
        };
        let out = take(outbuf, outbuflen);
        let status = String::from_utf8_lossy(&take(outs, outslen)).trim().to_string();
        if ret < 0 {
            let message = if status.is_empty() { super::error::meaning(-ret) } else { status };
            return Err(CephError::Command { op, code: ret, message });
        }
        Ok(MonReply { out, status })
    }

    /// A monitor command whose output is one JSON document.
    pub fn mon_json<T: DeserializeOwned>(&self, cmd: &Value) -> Result<T, CephError> {
        let op = cmd.get("prefix").and_then(Value::as_str).unwrap_or("mon command").to_string();
        let reply = self.mon_command(cmd)?;
        serde_json::from_slice(&reply.out)
            .map_err(|e| CephError::Reply { op, detail: format!("{e}: {}", String::from_utf8_lossy(&reply.out)) })
    }

    pub fn ioctx(&self, pool: &str) -> Result<IoCtx, CephError> {
        let p = cstring("pool name", pool)?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle; out-pointer to a local.
        check(&format!("open pool {pool}"), unsafe { ffi::rados_ioctx_create(self.h.0, p.as_ptr(), &mut io) })?;
        Ok(IoCtx { h: Arc::new(IoHandle { io, _cluster: self.h.clone() }), pool: pool.into() })
    }

    /// This client's addresses as the OSDs see them (`127.0.0.1:0/nonce`):
    /// what fencing puts on the blocklist.
    pub fn client_addrs(&self) -> Result<String, CephError> {
        let mut p: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle; librados returns a string it owns (not to be freed by us).
        check("rados_getaddrs", unsafe { ffi::rados_getaddrs(self.h.0, &mut p) })?;
        if p.is_null() {
            return Err(CephError::Reply { op: "rados_getaddrs".into(), detail: "no address".into() });
        }
        // SAFETY: NUL-terminated string returned by librados; copied at once.
        let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: rados_getaddrs hands ownership of the string to the caller.
        unsafe { libc::free(p as *mut libc::c_void) };
        Ok(s)
    }

    /// Blocks until this client has the newest OSD map. After fencing, the
    /// next operation this client sends carries that epoch, and an OSD must
    /// catch up to it before serving it, so from then on the fenced
    /// client's I/O to the same placement groups is refused.
    pub fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        // SAFETY: connected handle.
        check("wait for the latest OSD map", unsafe { ffi::rados_wait_for_latest_osdmap(self.h.0) })
    }

    pub fn instance_id(&self) -> u64 {
        // SAFETY: connected handle.
        unsafe { ffi::rados_get_instance_id(self.h.0) }
    }

    /// Raw capacity: (total, used, available) bytes and object count.
    pub fn stat(&self) -> Result<ClusterStat, CephError> {
        let mut s = ffi::rados_cluster_stat_t::default();
        // SAFETY: connected handle; out-pointer to a local of the C layout.
        check("rados_cluster_stat", unsafe { ffi::rados_cluster_stat(self.h.0, &mut s) })?;
        Ok(ClusterStat {
            total_bytes: s.kb * 1024,
            used_bytes: s.kb_used * 1024,
            avail_bytes: s.kb_avail * 1024,
            objects: s.num_objects,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStat {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub avail_bytes: u64,
    pub objects: u64,
}

pub(crate) struct IoHandle {
    pub(crate) io: ffi::rados_ioctx_t,
    _cluster: Arc<Handle>,
}

// SAFETY: an ioctx may be used from several threads (librados locks
// internally); Basalt never changes its snapshot context concurrently.
unsafe impl Send for IoHandle {}
// SAFETY: as above.
unsafe impl Sync for IoHandle {}

impl Drop for IoHandle {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; images opened on it hold an
        // Arc to this handle, so none outlives it.
        unsafe { ffi::rados_ioctx_destroy(self.io) }
    }
}

/// An open pool.
#[derive(Clone)]
pub struct IoCtx {
    pub(crate) h: Arc<IoHandle>,
    pool: String,
}

impl IoCtx {
    pub fn pool(&self) -> &str {
        &self.pool
    }
}
