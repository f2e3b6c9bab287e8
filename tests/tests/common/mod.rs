//! Helpers shared by test binaries that need basalt-storage, which the rig
//! library cannot offer (it is only a dev-dependency): `mod common;`.

use basalt_storage::ceph::{ClientConfig, Cluster};
use basalt_tests::rig::NetnsCeph;

/// The restricted `client.vm` on the namespace's Ceph, as the VMMs use it
/// (no librbd cache, a 30 s mount timeout).
pub fn vm_client(ceph: &NetnsCeph) -> Cluster {
    let cfg = ClientConfig {
        conf: Some(ceph.conf()),
        id: "vm".into(),
        keyring: Some(ceph.vm_keyring()),
        options: vec![("client_mount_timeout".into(), "30".into()), ("rbd_cache".into(), "false".into())],
    };
    Cluster::connect(&cfg).expect("connect to the namespace's Ceph as client.vm")
}
