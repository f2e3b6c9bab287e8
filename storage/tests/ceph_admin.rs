//! Ceph administration against the real dev Ceph: profiles, pools, OSD
//! tunables, balancer, health, and fencing with the blocklist.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use basalt_storage::ceph::profiles::{ErasureCodeProfile, OsdTunables, PoolKind, PoolSpec};
use basalt_storage::rbd::{self, Image, ImageOptions, RbdBackend};
use basalt_storage::{BlockBackend, BlockError, Op, Request};
use common::{admin, unique, vm, wait_completions};

#[test]
fn erasure_code_profiles_and_pools_are_created_and_bad_ones_refused() {
    let c = admin();
    let prof = ErasureCodeProfile { stripe_unit: Some(65536), ..ErasureCodeProfile::new(&unique("ec"), 2, 1) };
    c.create_ec_profile(&prof).expect("create profile");
    c.create_ec_profile(&prof).expect("same values again is fine");
    let got = c.ec_profile(&prof.name).expect("get");
    assert_eq!((got["k"].as_str(), got["m"].as_str(), got["plugin"].as_str()), ("2", "1", "jerasure"));
    assert_eq!(got["crush-failure-domain"], "osd");
    assert_eq!(got["stripe_unit"], "65536");
    // A different profile under the same name is refused by Ceph, never forced.
    let changed = ErasureCodeProfile { technique: Some("cauchy_good".into()), ..prof.clone() };
    let e = c.create_ec_profile(&changed).expect_err("no silent rewrite");
    assert!(e.to_string().contains("will not override"), "{e}");

    let ec_pool = PoolSpec { pg_num: Some(8), ..PoolSpec::erasure(&unique("ecpool"), &prof.name) };
    c.create_pool(&ec_pool).expect("EC pool");
    assert_eq!(c.pool_property(&ec_pool.name, "allow_ec_overwrites").expect("get"), "true");
    let rep = PoolSpec { pg_num: Some(8), ..PoolSpec::replicated(&unique("rep"), 2, 1) };
    c.create_pool(&rep).expect("replicated pool");
    assert_eq!(c.pool_property(&rep.name, "size").expect("size"), "2");
    assert_eq!(c.pool_property(&rep.name, "min_size").expect("min_size"), "1");
    c.set_pool(&rep.name, "min_size", "2").expect("set");
    assert_eq!(c.pool_property(&rep.name, "min_size").expect("min_size"), "2");
    assert!(c.pools().expect("pools").contains(&rep.name));

    // Refusals: nothing reaches Ceph, nothing changes.
    let profiles_before = c.ec_profiles().expect("ls");
    let pools_before = c.pools().expect("ls");
    for (bad, why) in [
        (ErasureCodeProfile::new(&unique("k1"), 1, 1), "at least 2"),
        (ErasureCodeProfile::new(&unique("m0"), 2, 0), "at least 1"),
        (ErasureCodeProfile { plugin: "nope".into(), ..ErasureCodeProfile::new(&unique("p"), 2, 1) }, "unknown plugin"),
    ] {
        let e = c.create_ec_profile(&bad).expect_err("refused");
        assert!(e.to_string().contains(why), "{e}");
    }
    let e = c.create_pool(&PoolSpec::replicated(&unique("r"), 2, 3)).expect_err("min_size > size");
    assert!(e.to_string().contains("min_size"), "{e}");
    let no_overwrites = PoolSpec {
        kind: PoolKind::Erasure { profile: prof.name.clone(), allow_ec_overwrites: false },
        ..PoolSpec::erasure(&unique("e"), &prof.name)
    };
    assert!(c.create_pool(&no_overwrites).expect_err("refused").to_string().contains("allow_ec_overwrites"));
    let missing = PoolSpec::erasure(&unique("e"), "no-such-profile");
    assert!(c.create_pool(&missing).expect_err("refused").to_string().contains("does not exist"));
    assert_eq!(c.ec_profiles().expect("ls"), profiles_before);
    assert_eq!(c.pools().expect("ls"), pools_before);

    c.remove_pool(&ec_pool.name).expect("rm");
    c.remove_pool(&rep.name).expect("rm");
    c.remove_ec_profile(&prof.name).expect("rm profile");
    assert!(!c.ec_profiles().expect("ls").contains(&prof.name));
}

#[test]
fn osd_tunables_are_set_and_read_back() {
    let c = admin();
    let names = ["osd_max_backfills", "osd_recovery_max_active", "osd_deep_scrub_stride", "osd_mon_heartbeat_interval"];
    let mut t = OsdTunables { name: "test".into(), values: BTreeMap::new() };
    t.values.insert("osd_max_backfills".into(), 3);
    t.values.insert("osd_recovery_max_active".into(), 5);
    t.values.insert("osd_deep_scrub_stride".into(), 1 << 20);
    t.values.insert("osd_mon_heartbeat_interval".into(), 20);
    c.apply_osd_tunables(&t).expect("apply");
    for (k, v) in &t.values {
        assert_eq!(c.osd_config("osd", k).expect("get"), v.to_string(), "{k}");
        assert_eq!(c.osd_config("osd.0", k).expect("get for one OSD"), v.to_string(), "{k} on osd.0");
    }
    // A set with one bad value is refused whole: nothing changes.
    let mut bad = t.clone();
    bad.values.insert("osd_max_backfills".into(), 7);
    bad.values.insert("osd_memory_target".into(), 1 << 20);
    assert!(c.apply_osd_tunables(&bad).expect_err("refused").to_string().contains("osd_memory_target"));
    assert_eq!(c.osd_config("osd", "osd_max_backfills").expect("get"), "3");
    c.reset_osd_tunables(&names).expect("reset");
    assert_ne!(c.osd_config("osd", "osd_max_backfills").expect("get"), "3");
}

#[test]
fn health_capacity_and_balancer() {
    let c = admin();
    let h = c.health().expect("health");
    assert!(h.status.starts_with("HEALTH_"), "{h:?}");
    let s = c.stat().expect("stat");
    assert!(s.total_bytes > 0 && s.avail_bytes > 0 && s.avail_bytes <= s.total_bytes, "{s:?}");
    let df = c.df().expect("df");
    assert!(df["pools"].as_array().is_some_and(|p| p.iter().any(|p| p["name"] == "rbd")), "{df}");
    let before = c.balancer_status().expect("status");
    let mode = before["mode"].as_str().expect("mode").to_string();
    c.set_balancer_mode("upmap").expect("mode");
    assert_eq!(c.balancer_status().expect("status")["mode"], "upmap");
    let score = c.balancer_eval().expect("eval");
    assert!(score.contains("score"), "{score}");
    assert!(c.set_balancer_mode("fastest").is_err());
    c.set_balancer_mode(&mode).expect("restore");
}

#[test]
fn blocklisting_a_client_fences_its_writes() {
    let a = admin();
    let victim = vm();
    let io = victim.ioctx("rbd").expect("pool");
    let name = unique("fence");
    rbd::create(&io, &name, 8 << 20, &ImageOptions::default()).expect("create");
    let mut b = RbdBackend::open(&io, &name, true, false).expect("open");
    b.submit(Request { tag: 1, op: Op::Write { offset: 0, data: vec![7; 4096] } }).expect("submit");
    assert!(wait_completions(&mut b, 1, Duration::from_secs(30))[0].result.is_ok());

    let addr = victim.client_addrs().expect("addrs");
    a.fence(&addr, 600).expect("blocklist");
    assert!(a.blocklist().expect("ls").iter().any(|e| e.addr == addr), "listed");
    // Any I/O from a client with the new map makes the OSD serving this
    // object catch up first; from then on the fenced client is refused.
    let aio = a.ioctx("rbd").expect("pool");
    Image::open(&aio, &name).expect("open").read_at(0, 4096).expect("read");
    b.submit(Request { tag: 2, op: Op::Write { offset: 4096, data: vec![8; 4096] } }).expect("submit");
    let r = wait_completions(&mut b, 1, Duration::from_secs(60)).pop().expect("one").result;
    match r {
        Err(BlockError::Ceph(e)) => assert_eq!(e.code(), Some(-libc::ESHUTDOWN), "fenced: {e}"),
        other => panic!("a fenced client's write must fail, got {other:?}"),
    }
    drop(b);
    a.blocklist_remove(&addr).expect("unblocklist");
    assert!(!a.blocklist().expect("ls").iter().any(|e| e.addr == addr));
    assert!(a.blocklist_add("not-an-address", 60).is_err());
    // The data written before fencing is intact; the fenced write never landed.
    let io = admin().ioctx("rbd").expect("pool");
    let img = Image::open(&io, &name).expect("open");
    assert_eq!(img.read_at(0, 4096).expect("read"), vec![7; 4096]);
    assert_eq!(img.read_at(4096, 4096).expect("read"), vec![0; 4096]);
    drop(img);
    rbd::remove(&io, &name).expect("remove");
}

#[test]
fn exclusive_lock_moves_only_after_fencing_the_holder() {
    let a = admin();
    let host1 = vm();
    let host2 = vm();
    let io1 = host1.ioctx("rbd").expect("pool");
    let io2 = host2.ioctx("rbd").expect("pool");
    let name = unique("lock");
    rbd::create(&io1, &name, 8 << 20, &ImageOptions::default()).expect("create");
    let mut b1 = RbdBackend::open(&io1, &name, true, false).expect("host1 opens with the lock");
    assert!(b1.image().is_lock_owner().expect("owner"));
    // host2 may not take the disk while host1 holds it.
    let e = RbdBackend::open(&io2, &name, true, false).err().expect("host2 refused");
    assert!(e.code().is_some(), "{e}");
    let owners = Image::open(&io2, &name).expect("open").lock_owners().expect("owners");
    assert_eq!(owners.len(), 1, "{owners:?}");

    // Fence host1 first, then break its lock: host2 gets the disk.
    a.fence(&host1.client_addrs().expect("addrs"), 600).expect("fence");
    let img2 = Image::open(&io2, &name).expect("open");
    img2.break_lock(&owners[0]).expect("break lock");
    drop(img2);
    let mut b2 = RbdBackend::open(&io2, &name, true, false).expect("host2 takes the disk");
    b2.submit(Request { tag: 1, op: Op::Write { offset: 0, data: vec![2; 4096] } }).expect("submit");
    assert!(wait_completions(&mut b2, 1, Duration::from_secs(30))[0].result.is_ok());
    b1.submit(Request { tag: 1, op: Op::Write { offset: 0, data: vec![1; 4096] } }).expect("submit");
    assert!(wait_completions(&mut b1, 1, Duration::from_secs(60))[0].result.is_err(), "old holder cannot write");
    assert_eq!(b2.image().read_at(0, 4096).expect("read"), vec![2; 4096]);
    drop(b1);
    drop(b2);
    a.blocklist_remove(&host1.client_addrs().expect("addrs")).expect("unfence");
    rbd::remove(&io2, &name).expect("remove");
}
