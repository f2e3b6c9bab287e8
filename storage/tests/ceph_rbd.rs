//! RBD images and the RBD block backend against the real dev Ceph.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use basalt_storage::rbd::{self, features, Image, ImageOptions, RbdBackend};
use basalt_storage::{BlockBackend, BlockError, Op, Request};
use common::{admin, unique, vm, wait_completions};

const MIB: u64 = 1 << 20;

#[test]
fn image_lifecycle_snapshots_clones_and_refusals() {
    let c = vm();
    let io = c.ioctx("rbd").expect("pool rbd");
    let golden = unique("golden");
    rbd::create(
        &io,
        &golden,
        64 * MIB,
        &ImageOptions { features: Some(features::VM_DEFAULT), order: Some(22), ..Default::default() },
    )
    .expect("create");
    assert!(rbd::list(&io).expect("list").contains(&golden));
    {
        let img = Image::open(&io, &golden).expect("open");
        let info = img.info().expect("info");
        assert_eq!((info.size, info.order, info.object_size), (64 * MIB, 22, 4 * MIB));
        assert_eq!(info.features & features::VM_DEFAULT, features::VM_DEFAULT);
        img.write_at(MIB, b"golden image bytes").expect("write");
        img.resize(128 * MIB).expect("grow");
        assert_eq!(img.size().expect("size"), 128 * MIB);
        img.snap_create("base").expect("snapshot");
        img.snap_protect("base").expect("protect");
        assert!(img.snap_is_protected("base").expect("query"));
        // A protected snapshot cannot be removed: Ceph's error comes back with its code.
        let e = img.snap_remove("base").expect_err("protected");
        assert_eq!(e.code(), Some(-libc::EBUSY), "{e}");
    }
    let child = unique("vm-disk");
    rbd::clone(&io, &golden, "base", &io, &child, &ImageOptions::default()).expect("clone");
    {
        let img = Image::open(&io, &child).expect("open clone");
        assert_eq!(img.read_at(MIB, 18).expect("read through parent"), b"golden image bytes");
        img.flatten().expect("flatten");
        img.write_at(0, b"child").expect("write child");
    }
    // The parent snapshot can go once the child no longer depends on it.
    let img = Image::open(&io, &golden).expect("open");
    img.snap_unprotect("base").expect("unprotect after flatten");
    img.snap_remove("base").expect("remove snapshot");
    drop(img);
    rbd::remove(&io, &child).expect("remove child");
    rbd::remove(&io, &golden).expect("remove golden");
    let e = rbd::remove(&io, &golden).expect_err("already gone");
    assert_eq!(e.code(), Some(-libc::ENOENT));
    assert!(e.to_string().contains("no such"), "{e}");
    // Refused before anything is sent.
    assert!(rbd::create(&io, "bad/name", MIB, &ImageOptions::default()).is_err());
    assert!(rbd::create(&io, &unique("zero"), 0, &ImageOptions::default()).is_err());
    let bad_order = ImageOptions { order: Some(30), ..Default::default() };
    assert!(rbd::create(&io, &unique("o"), MIB, &bad_order).unwrap_err().to_string().contains("order"));
    assert!(!rbd::list(&io).expect("list").iter().any(|n| n.starts_with("zero-") || n.starts_with("o-")));
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i.wrapping_mul(131) as usize + j * 7) as u8 ^ 0x5a).collect()
}

fn aio_round_trip(pool_opts: ImageOptions, prefix: &str) {
    let c = vm();
    let io = c.ioctx("rbd").expect("pool rbd");
    let name = unique(prefix);
    rbd::create(&io, &name, 64 * MIB, &pool_opts).expect("create");
    let mut b = RbdBackend::open(&io, &name, true, false).expect("open backend");
    assert_eq!(b.size(), 64 * MIB);
    const N: u64 = 64;
    const LEN: usize = 64 * 1024;
    // 64 writes in flight at once, each at its own offset.
    for i in 0..N {
        b.submit(Request { tag: i, op: Op::Write { offset: i * 512 * 1024, data: pattern(i, LEN) } }).expect("submit");
    }
    let done = wait_completions(&mut b, N as usize, Duration::from_secs(60));
    assert!(done.iter().all(|c| c.result.is_ok()), "{:?}", done.iter().find(|c| c.result.is_err()));
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..N).collect::<Vec<_>>());
    b.submit(Request { tag: 1000, op: Op::Flush }).expect("flush");
    assert!(wait_completions(&mut b, 1, Duration::from_secs(30))[0].result.is_ok());
    // 64 reads in flight, checked byte for byte.
    for i in 0..N {
        b.submit(Request { tag: 100 + i, op: Op::Read { offset: i * 512 * 1024, len: LEN as u32 } }).expect("submit");
    }
    let reads: HashMap<u64, Vec<u8>> = wait_completions(&mut b, N as usize, Duration::from_secs(60))
        .into_iter()
        .map(|c| (c.tag, c.result.expect("read ok")))
        .collect();
    for i in 0..N {
        assert_eq!(reads[&(100 + i)], pattern(i, LEN), "request {i}");
    }
    // Discard and write-zeroes read back as zeroes.
    b.submit(Request { tag: 2000, op: Op::WriteZeroes { offset: 0, len: 4096 } }).expect("zeroes");
    b.submit(Request { tag: 2001, op: Op::Discard { offset: 512 * 1024, len: 64 * 1024 } }).expect("discard");
    assert!(wait_completions(&mut b, 2, Duration::from_secs(30)).iter().all(|c| c.result.is_ok()));
    b.submit(Request { tag: 2002, op: Op::Read { offset: 0, len: 4096 } }).expect("read");
    let z = wait_completions(&mut b, 1, Duration::from_secs(30)).pop().expect("one").result.expect("ok");
    assert!(z.iter().all(|&x| x == 0));
    // A request past the end completes with an error and touches nothing.
    b.submit(Request { tag: 3000, op: Op::Write { offset: 64 * MIB - 512, data: vec![1; 1024] } }).expect("accepted");
    let e = wait_completions(&mut b, 1, Duration::from_secs(5)).pop().expect("one").result.expect_err("refused");
    assert!(matches!(e, BlockError::OutOfRange { .. }), "{e}");
    drop(b);
    rbd::remove(&io, &name).expect("remove");
}

#[test]
fn aio_with_64_requests_in_flight_checked_byte_for_byte() {
    aio_round_trip(ImageOptions::default(), "aio");
}

#[test]
fn erasure_coded_data_pool_image() {
    let a = admin();
    let ec_pool_id: i64 = a
        .mon_json::<serde_json::Value>(
            &serde_json::json!({"prefix": "osd pool ls", "detail": "detail", "format": "json"}),
        )
        .expect("pool ls")
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["pool_name"] == "rbd-ec"))
        .and_then(|p| p["pool_id"].as_i64())
        .expect("rbd-ec pool exists");
    let c = vm();
    let io = c.ioctx("rbd").expect("pool rbd");
    let name = unique("ec");
    rbd::create(&io, &name, 16 * MIB, &ImageOptions { data_pool: Some("rbd-ec".into()), ..Default::default() })
        .expect("create");
    let info = Image::open(&io, &name).expect("open").info().expect("info");
    assert_eq!(info.data_pool_id, Some(ec_pool_id), "data objects live in rbd-ec");
    assert_ne!(info.features & features::DATA_POOL, 0);
    rbd::remove(&io, &name).expect("remove");
    // Striping settings reach the image.
    let striped = unique("striped");
    let opts = ImageOptions {
        features: Some(features::VM_DEFAULT | features::STRIPINGV2),
        stripe_unit: Some(64 * 1024),
        stripe_count: Some(4),
        ..Default::default()
    };
    rbd::create(&io, &striped, 16 * MIB, &opts).expect("create striped");
    let info = Image::open(&io, &striped).expect("open").info().expect("info");
    assert_eq!((info.stripe_unit, info.stripe_count), (64 * 1024, 4));
    rbd::remove(&io, &striped).expect("remove");
    let bad = ImageOptions { stripe_unit: Some(3000), stripe_count: Some(2), ..Default::default() };
    assert!(rbd::create(&io, &unique("bad"), MIB, &bad).unwrap_err().to_string().contains("stripe"));
    aio_round_trip(ImageOptions { data_pool: Some("rbd-ec".into()), ..Default::default() }, "ec-aio");
}

#[test]
fn without_an_explicit_lock_the_writer_takes_the_lock_over_cooperatively() {
    let (c1, c2) = (vm(), vm());
    let (io1, io2) = (c1.ioctx("rbd").expect("pool"), c2.ioctx("rbd").expect("pool"));
    let name = unique("handoff");
    rbd::create(&io1, &name, 8 * MIB, &ImageOptions::default()).expect("create");
    let a = Image::open(&io1, &name).expect("open a");
    let b = Image::open(&io2, &name).expect("open b");
    a.write_at(0, b"from a").expect("a writes");
    assert!(a.is_lock_owner().expect("owner"));
    b.write_at(4096, b"from b").expect("b writes: a hands the lock over");
    assert!(b.is_lock_owner().expect("owner"));
    assert!(!a.is_lock_owner().expect("owner"));
    assert_eq!(a.read_at(0, 6).expect("read"), b"from a");
    assert_eq!(a.read_at(4096, 6).expect("read"), b"from b");
    drop((a, b));
    rbd::remove(&io1, &name).expect("remove");
}
