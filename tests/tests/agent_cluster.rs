//! The whole product, end to end: a real Ceph and three real controllers in a
//! private network namespace, bound to its bridge address; two emulated arm64
//! hosts on that bridge, each running `basalt-agent`, which runs VMs with
//! `basalt-vmm` under real (nested) KVM on RBD disks.
//!
//! Shown: a storage profile and a volume made real in Ceph by the leader; a VM
//! scheduled, booted, its guest writing a pattern to its RBD disk and powering
//! off (read back from the image with the storage crate); stop/start; two VMs
//! of one anti-affinity group on different hosts; a VM that cannot fit refused
//! with the reason; deleting a VM with its disks removes the image. Then the
//! agents' resilience: every controller stopped while a VM runs — it keeps
//! running (its guest keeps writing) — and after the restart the agents
//! re-sync and act on new requests. Live migration through basaltctl: the
//! ticker moves to the other host and back without its guest restarting, a
//! cancelled migration leaves it in place, a drain moves two VMs. Last, failover: an HA VM's host loses
//! its agent while the VM still writes; the node is fenced out of Ceph and
//! the VM restarts on the other host, and only the new instance can write.

use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use basalt_storage::ceph::{ClientConfig, Cluster};
use basalt_tests::controllers::{host_bin, scrape_metrics, ControllerCluster, Options};
use basalt_tests::rig::netns::BRIDGE_ADDR;
use basalt_tests::rig::{guest, Arm64Host, Artifacts, Netns, NetnsCeph};
use tonic::transport::Channel;

/// The guest: by kernel argument, either a writer (writes a pattern and its
/// run count, then powers off) or a ticker (writes a counter every second).
const GUEST: &str = r#"
case "$(cat /proc/cmdline)" in
*basalt.role=net*)
    # Addressed by DHCP, which the VMM answers with the controllers' lease
    # (the ip= the agent also adds is shown beside it, unused).
    printf '#!/bin/sh\n[ "$1" = bound ] && ifconfig "$interface" "$ip" netmask "$subnet" up && echo "DHCP-BOUND $ip/$subnet router=$router host=$hostname"\nexit 0\n' > /tmp/dhcp.sh
    chmod +x /tmp/dhcp.sh
    ifconfig eth0 up
    udhcpc -i eth0 -s /tmp/dhcp.sh -q -n -t 10 -T 2 2>/dev/null || echo "DHCP-FAILED"
    arg=$(sed -n 's/.* ip=\([^ :]*\).*/\1/p' /proc/cmdline)
    echo "NET-UP $(ip -4 addr show eth0 | sed -n 's/.*inet \([0-9.]*\).*/\1/p') mtu=$(cat /sys/class/net/eth0/mtu) ip-arg=$arg"
    peer=$(sed -n 's/.*basalt.peer=\([0-9.]*\).*/\1/p' /proc/cmdline)
    case "$(cat /proc/cmdline)" in
    *basalt.net=send*)
        i=0; until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 300 ] && break; done
        ping -c 3 "$peer" | grep -q ' 0% packet loss' && echo "NET-PING-OK"
        # 64 MiB: an 8 MiB random block eight times (a busybox guest makes
        # random bytes fast, other patterns slowly).
        dd if=/dev/urandom of=/tmp/blk bs=1M count=8 2>/dev/null
        stream() { for k in 1 2 3 4 5 6 7 8; do cat /tmp/blk; done; }
        echo "NET-SENT-MD5 $(stream | md5sum | cut -c1-32)"
        # Paced (basalt.pace seconds between blocks), so that a migration
        # of the receiver happens while the stream flows.
        pace=$(sed -n 's/.*basalt.pace=\([0-9]*\).*/\1/p' /proc/cmdline)
        paced() { for k in 1 2 3 4 5 6 7 8; do cat /tmp/blk; sleep "${pace:-0}"; done; }
        echo "NET-SENDING"
        i=0; t0=$(date +%s)
        until paced | nc -w 3 "$peer" 5000; do
            i=$((i+1)); [ $i -gt 60 ] && break; sleep 1
        done
        echo "NET-SENT in $(( $(date +%s) - t0 )) s" ;;
    *basalt.net=recv*)
        echo "NET-RECV $(nc -l -p 5000 | md5sum | cut -c1-32)" ;;
    *basalt.net=probe*)
        # An address in the other network's subnet: only a leak between
        # the two segments could answer it.
        ip addr add 10.60.0.99/24 dev eth0
        if ping -c 3 -W 1 "$peer" >/dev/null 2>&1; then echo "NET-LEAK"; else echo "NET-ISOLATED"; fi ;;
    esac
    while true; do sleep 60; done ;;
*basalt.role=ticker*)
    # Counts on from what the disk holds, tagged with this boot's id: a
    # restarted VM shows a new tag, a second writer would show two.
    i=$(dd if=/dev/vda bs=512 skip=2 count=1 iflag=direct 2>/dev/null | sed -n 's/^TICK \([0-9]*\).*/\1/p')
    i=${i:-0}
    b=$(cut -c1-8 /proc/sys/kernel/random/boot_id)
    while true; do
        i=$((i+1))
        echo "TICK $i $b" | dd of=/dev/vda bs=512 seek=2 count=1 conv=sync oflag=direct 2>/dev/null
        echo "TICK $i"
        sleep 1
    done ;;
*)
    n=$(dd if=/dev/vda bs=512 skip=1 count=1 iflag=direct 2>/dev/null | tr -dc 0-9)
    n=$(( ${n:-0} + 1 ))
    echo "BASALT-E2E-PATTERN run $n" | dd of=/dev/vda bs=512 count=1 conv=sync oflag=direct 2>/dev/null
    echo "$n" | dd of=/dev/vda bs=512 seek=1 count=1 conv=sync oflag=direct 2>/dev/null
    echo "GUEST-WROTE run $n" ;;
esac
"#;

/// A pool the controllers create for the profile; the leader grants the
/// agents' restricted key (client.vm) access to it.
const POOL: &str = "e2e-vms";
const PROFILE: &str = "e2e-rep";

struct Api {
    rt: tokio::runtime::Runtime,
    client: ClusterServiceClient<Channel>,
}

impl Api {
    fn vm(&self, name: &str) -> Option<pb::Vm> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.get_vm(pb::GetRequest { name: name.into(), allow_stale: false }))
            .ok()
            .map(|r| r.into_inner())
    }

    fn volume(&self, name: &str) -> Option<pb::Volume> {
        let mut c = self.client.clone();
        self.rt
            .block_on(c.get_volume(pb::GetRequest { name: name.into(), allow_stale: false }))
            .ok()
            .map(|r| r.into_inner())
    }

    fn nodes(&self) -> Vec<pb::Node> {
        let mut c = self.client.clone();
        self.rt.block_on(c.list_nodes(pb::ListRequest::default())).map(|r| r.into_inner().nodes).unwrap_or_default()
    }

    fn power(&self, name: &str, power: pb::Power) {
        let mut c = self.client.clone();
        let req = pb::SetVmPowerRequest { name: name.into(), power: power as i32, expected_generation: 0 };
        self.rt.block_on(c.set_vm_power(req)).unwrap_or_else(|e| panic!("set power of {name}: {e}"));
    }

    /// Polls (through retries while elections run) until `f` gives a value.
    fn eventually<T>(&self, what: &str, timeout: Duration, mut f: impl FnMut(&Api) -> Option<T>) -> T {
        let end = Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            assert!(Instant::now() < end, "timed out after {timeout:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn wait_phase(&self, vm: &str, phase: pb::VmPhase, timeout: Duration) -> pb::Vm {
        self.eventually(&format!("vm {vm} {}", phase.as_str_name()), timeout, |a| {
            a.vm(vm).filter(|v| v.observed.as_ref().is_some_and(|o| o.phase == phase as i32))
        })
    }
}

fn vm_spec(memory_mib: u64, volume: Option<&str>, role: &str, group: &str) -> pb::VmSpec {
    pb::VmSpec {
        vcpus: 1,
        memory_mib,
        boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: "/basalt/guest/Image".into(),
            initrd: "/basalt/guest/initrd".into(),
            cmdline: format!("console=ttyS0 quiet panic=-1 basalt.role={role}"),
        })),
        disks: volume.map(|v| pb::Disk { volume: v.into(), read_only: false }).into_iter().collect(),
        anti_affinity_group: group.into(),
        ..Default::default()
    }
}

/// What VM networks need of the host kernel (the base initramfs loads only
/// what booting needs), in dependency order.
const HOST_MODULES: [(&str, &str); 7] = [
    ("llc", "net/llc/llc.ko"),
    ("stp", "net/802/stp.ko"),
    ("bridge", "net/bridge/bridge.ko"),
    ("tun", "drivers/net/tun.ko"),
    ("udp_tunnel", "net/ipv4/udp_tunnel.ko"),
    ("ip6_udp_tunnel", "net/ipv6/ip6_udp_tunnel.ko"),
    ("vxlan", "drivers/net/vxlan/vxlan.ko"),
];

fn agent_host(arts: &Artifacts, ns: &mut Netns, ceph: &NetnsCeph, octet: u8, controllers: &str) -> Arm64Host {
    let id = format!("host-{octet}");
    let modules: Vec<&str> = HOST_MODULES.iter().map(|(n, _)| *n).collect();
    let modules = modules.join(" ");
    // A connection to port 7300 restarts the agent (SIGTERM, then a new one;
    // after a kill, just a new one): its running VMs must be adopted, not
    // lost or started twice. One to port 7301 kills it (SIGKILL), leaving its
    // VMMs running: a host the controllers lose while its VMs still write.
    let script = format!(
        "set -e\nmkdir -p /etc/ceph\ncp /basalt/ceph/ceph.conf /basalt/ceph/vm.keyring /etc/ceph/\n\
         for m in {modules}; do insmod /basalt/mod/$m.ko || echo \"HOST: insmod $m failed\"; done\n\
         export PATH=/sysroot/opt/iproute2/bin:$PATH\n\
         start_agent() {{ NO_COLOR=1 basalt-agent --host-id {id} --address 10.77.0.{octet}:7200 {controllers} \
         --vmm /basalt/bin/basalt-vmm --state-dir /tmp/agent --ceph-conf /etc/ceph/ceph.conf --ceph-id vm \
         --ceph-keyring /etc/ceph/vm.keyring --vcpus 4 --memory-mib 600 --label host={id} \
         --metrics-listen 0.0.0.0:9110 --nic-profile spread & echo $! > /tmp/agent.pid; }}\n\
         start_agent\n\
         ( while true; do nc -l -p 7301 </dev/null >/dev/null 2>&1 || {{ sleep 1; continue; }}; \
           kill -KILL $(cat /tmp/agent.pid); echo AGENT-KILLED; done ) &\n\
         ( while true; do nc -l -p 7302 </dev/null >/dev/null 2>&1 || {{ sleep 1; continue; }}; \
           d=$(basename $(readlink -f /sys/class/net/eth0/device)); \
           irq=$(awk -v d=$d '$NF == d {{ sub(\":\", \"\", $1); print $1 }}' /proc/interrupts); \
           echo \"TUNING irq=$irq affinity=$(cat /proc/irq/$irq/smp_affinity_list) \
           rps=$(cat /sys/class/net/eth0/queues/rx-0/rps_cpus) \
           taps=$(cat /sys/class/net/bt*/queues/rx-0/rps_cpus 2>/dev/null | tr '\\n' ,)\"; done ) &\n\
         while true; do\n\
           nc -l -p 7300 </dev/null >/dev/null 2>&1 || {{ sleep 1; continue; }}\n\
           p=$(cat /tmp/agent.pid); kill -TERM $p 2>/dev/null || true; while kill -0 $p 2>/dev/null; do sleep 0.1; done\n\
           echo AGENT-RESTART; start_agent\n\
         done\n"
    );
    let conf = ceph.host_conf("/etc/ceph/vm.keyring").expect("host ceph.conf");
    let host = guest::with_modules(Arm64Host::new(&id), arts, &HOST_MODULES).expect("modules");
    let keyring = std::fs::read(ceph.vm_keyring()).expect("vm keyring");
    // Two CPUs: NIC tuning then has a choice to make.
    host.smp(2)
        .memory_mib(1536)
        .timeout(Duration::from_secs(1500))
        .nic(ns.add_host_nic(octet).expect("tap"))
        .libs(arts)
        .expect("libs disk")
        .arm64_dynamic_bin(arts, "basalt-vmm")
        .expect("dynamic basalt-vmm")
        .arm64_bin(arts, "basalt-agent")
        .expect("basalt-agent")
        .file("guest/Image", guest::kernel(arts).expect("kernel"), 0o644)
        .file("guest/initrd", guest::initramfs(arts, GUEST).expect("initramfs"), 0o644)
        .file("ceph/ceph.conf", conf.into_bytes(), 0o644)
        .file("ceph/vm.keyring", keyring, 0o600)
        .script(&script)
}

/// The test's own client of the namespace's Ceph (admin), on the VMs' pool.
fn with_pool<T>(ceph: &NetnsCeph, f: impl FnOnce(&basalt_storage::ceph::IoCtx) -> T) -> T {
    f(&admin_cluster(ceph).ioctx(POOL).expect("pool"))
}

fn read_image(ceph: &NetnsCeph, image: &str, offset: u64, len: usize) -> Vec<u8> {
    with_pool(ceph, |io| {
        let img = basalt_storage::rbd::Image::open(io, image).expect("open image");
        img.read_at(offset, len).expect("read image")
    })
}

/// A ticker's last write: its count and the tag of the boot that wrote it.
fn tick(ceph: &NetnsCeph, image: &str) -> (u64, String) {
    let t = text(&read_image(ceph, image, 1024, 512));
    let mut w = t.strip_prefix("TICK ").unwrap_or("").split_whitespace();
    let n = w.next().and_then(|n| n.parse().ok()).unwrap_or(0);
    (n, w.next().unwrap_or("").to_string())
}

/// The clients holding the image's exclusive lock.
fn lock_owners(ceph: &NetnsCeph, image: &str) -> Vec<String> {
    with_pool(ceph, |io| basalt_storage::rbd::Image::open(io, image).and_then(|i| i.lock_owners()))
        .unwrap_or_else(|e| panic!("lock owners of {image}: {e}"))
}

fn admin_cluster(ceph: &NetnsCeph) -> Cluster {
    let cfg = ClientConfig { conf: Some(ceph.conf()), keyring: Some(ceph.admin_keyring()), ..ClientConfig::default() };
    Cluster::connect(&cfg).expect("connect to the namespace's Ceph")
}

fn image_exists(ceph: &NetnsCeph, image: &str) -> bool {
    with_pool(ceph, |io| basalt_storage::rbd::list(io).expect("list images").iter().any(|i| i == image))
}

/// The emulated hosts; if the test fails, their consoles (the agents' logs) are printed.
struct Hosts(Vec<basalt_tests::rig::Running>);

impl Drop for Hosts {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for h in &self.0 {
                eprintln!("--- host console tail\n{}", tail(&h.console(), 80));
            }
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end_matches(['\0', '\n']).to_string()
}

#[test]
fn vms_run_on_agents_in_emulated_hosts_with_rbd_disks() {
    let t0 = Instant::now();
    let arts = Artifacts::locate().expect("rig artifacts");
    let mut ns = Netns::create("basalt-e2e").expect("network namespace");
    // This thread (and the runtime and controllers it starts) live in the
    // namespace: they reach Ceph and the hosts on the bridge, nothing else.
    ns.enter_current_thread().expect("enter the namespace");
    let ceph = NetnsCeph::start(&ns).expect("Ceph in the namespace");
    eprintln!("[e2e] Ceph up after {:.0?}", t0.elapsed());
    let ctl_cfg = format!(
        "[ceph]\nconf = \"{}\"\nid = \"admin\"\nkeyring = \"{}\"\nvm_client = \"vm\"\n",
        ceph.conf().display(),
        ceph.admin_keyring().display()
    );
    let mut ctl = ControllerCluster::start(3, Options { config: ctl_cfg, host: Some(BRIDGE_ADDR.into()) });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(ctl.wait_leader(Duration::from_secs(30)));
    let api = Api { client: rt.block_on(async { ctl.client(1) }), rt };
    let controllers: String = ctl.ids().iter().map(|id| format!("--controller {} ", ctl.addr(*id))).collect();

    let mut hosts = Hosts(
        [11u8, 12]
            .iter()
            .map(|o| agent_host(&arts, &mut ns, &ceph, *o, &controllers).spawn().expect("spawn host"))
            .collect(),
    );
    api.eventually("both agents registered and Ready", Duration::from_secs(400), |a| {
        let n = a.nodes();
        (n.len() == 2 && n.iter().all(|n| n.state == pb::NodeState::Ready as i32)).then_some(())
    });
    eprintln!("[e2e] agents registered after {:.0?}", t0.elapsed());

    let endpoints: Vec<String> = ctl.ids().iter().map(|id| ctl.addr(*id)).collect();
    let basaltctl = |args: &[&str]| {
        let out = std::process::Command::new(host_bin("basaltctl"))
            .arg("--endpoints")
            .arg(endpoints.join(","))
            .args(args)
            .output()
            .expect("run basaltctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // NIC tuning: each agent found its host's NIC and applied `spread`;
    // the kernel's own files, read in the host, say so too.
    for (ix, octet) in [11u8, 12].into_iter().enumerate() {
        let id = format!("host-{octet}");
        let (rc, out, err) = basaltctl(&["-o", "json", "node", "show", &id]);
        assert_eq!(rc, Some(0), "{err}");
        let j: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(j["nic_profile"], "spread", "{j}");
        let nic = &j["nics"][0];
        assert_eq!((nic["name"].as_str(), nic["driver"].as_str()), (Some("eth0"), Some("virtio_net")), "{j}");
        assert!(nic["timestamping"].as_array().is_some_and(|t| t.iter().any(|c| c == "software-receive")), "{j}");
        let tuned = nic["tuned"].as_array().expect("tuned");
        assert!(tuned.iter().any(|t| t["knob"] == "rx-0 rps" && t["cpus"] == "0-1" && t.get("error").is_none()), "{j}");
        assert!(!tuned.iter().any(|t| t["knob"] == "tx-0 xps"), "one transmit queue: no XPS: {j}");
        assert!(
            tuned.iter().any(|t| t["knob"].as_str().is_some_and(|k| k.starts_with("irq ")) && t["cpus"] == "0"),
            "{j}"
        );
        std::net::TcpStream::connect(format!("10.77.0.{octet}:7302")).expect("ask the host for its tuning");
        assert!(hosts.0[ix].wait_for_console("TUNING ", Duration::from_secs(30)), "{id} read its tuning back");
        let console = hosts.0[ix].console();
        let line = console.lines().find(|l| l.contains("TUNING ")).expect("line");
        assert!(line.contains("affinity=0 rps=3"), "{id}: {line}");
    }

    // Storage: the profile and the volume become real in Ceph.
    let mut c = api.client.clone();
    let profile = pb::StorageProfile {
        name: PROFILE.into(),
        kind: Some(pb::storage_profile::Kind::Replicated(pb::ReplicatedProfile { size: 3, min_size: 2 })),
        ..Default::default()
    };
    api.rt.block_on(c.create_profile(profile)).expect("create profile");
    let vol = |name: &str| pb::Volume {
        name: name.into(),
        pool: POOL.into(),
        image: format!("{name}-img"),
        size_bytes: 64 << 20,
        profile: PROFILE.into(),
        ..Default::default()
    };
    for v in ["writer-disk", "aa1-disk", "aa2-disk", "ticker-disk", "ticker2-disk", "ha-disk", "ha2-disk", "nb-disk"] {
        api.rt.block_on(c.create_volume(vol(v))).unwrap_or_else(|e| panic!("create volume {v}: {e}"));
    }
    for v in ["writer-disk", "aa1-disk", "aa2-disk", "ticker-disk", "ticker2-disk", "ha-disk", "ha2-disk", "nb-disk"] {
        api.eventually(&format!("volume {v} READY"), Duration::from_secs(120), |a| {
            a.volume(v).filter(|x| x.state == pb::StorageState::Ready as i32)
        });
    }
    assert!(image_exists(&ceph, "writer-disk-img"), "the volume's image is in Ceph");
    // READY also means client.vm's caps now name the profile's pool.
    api.eventually("profile READY", Duration::from_secs(60), |a| {
        let mut c = a.client.clone();
        let p = a.rt.block_on(c.get_profile(pb::GetRequest { name: PROFILE.into(), allow_stale: false })).ok()?;
        (p.into_inner().state == pb::StorageState::Ready as i32).then_some(())
    });

    // A VM boots on an agent, writes its disk and powers off.
    let create = |name: &str, spec: pb::VmSpec| {
        let mut c = api.client.clone();
        let req = pb::CreateVmRequest { name: name.into(), spec: Some(spec), desired_power: pb::Power::Running as i32 };
        api.rt.block_on(c.create_vm(req)).map(|r| r.into_inner())
    };
    create("writer", vm_spec(128, Some("writer-disk"), "writer", "")).expect("create writer");
    let vm = api.wait_phase("writer", pb::VmPhase::Stopped, Duration::from_secs(400));
    eprintln!("[e2e] writer ran and powered off after {:.0?}", t0.elapsed());
    let obs = vm.observed.clone().unwrap_or_default();
    assert!(obs.message.contains("powered off"), "stopped because the guest powered off: {obs:?}");
    assert!(vm.placement.starts_with("host-"), "placed on an agent's host: {vm:?}");
    assert_eq!(vm.desired_power, pb::Power::Stopped as i32, "the guest's power-off became the desired power");
    let head = text(&read_image(&ceph, "writer-disk-img", 0, 512));
    assert_eq!(head, "BASALT-E2E-PATTERN run 1", "the guest's write is in the RBD image");

    // Start again: a second run on the same disk.
    api.power("writer", pb::Power::Running);
    api.eventually("writer's second run", Duration::from_secs(400), |a| {
        let v = a.vm("writer")?;
        let stopped = v.observed.as_ref().is_some_and(|o| o.phase == pb::VmPhase::Stopped as i32);
        (stopped && v.desired_power == pb::Power::Stopped as i32).then_some(())?;
        (text(&read_image(&ceph, "writer-disk-img", 0, 512)) == "BASALT-E2E-PATTERN run 2").then_some(())
    });
    eprintln!("[e2e] writer's second run after {:.0?}", t0.elapsed());

    // Anti-affinity: two VMs of one group land on different hosts.
    create("aa1", vm_spec(128, Some("aa1-disk"), "writer", "e2e-group")).expect("create aa1");
    create("aa2", vm_spec(128, Some("aa2-disk"), "writer", "e2e-group")).expect("create aa2");
    let placed: Vec<String> = ["aa1", "aa2"]
        .iter()
        .map(|n| {
            api.eventually(&format!("{n} placed"), Duration::from_secs(60), |a| {
                a.vm(n).map(|v| v.placement).filter(|p| !p.is_empty())
            })
        })
        .collect();
    assert_ne!(placed[0], placed[1], "one anti-affinity group, two hosts");
    // A VM that fits nowhere is refused, saying why.
    create("too-big", vm_spec(100_000, None, "writer", "")).expect("create too-big (it stays pending)");
    let reason = api.eventually("too-big's refusal", Duration::from_secs(30), |a| {
        a.vm("too-big").map(|v| v.unschedulable_reason).filter(|r| !r.is_empty())
    });
    assert!(reason.contains("memory"), "the refusal names memory: {reason}");
    assert!(api.vm("too-big").is_some_and(|v| v.placement.is_empty()), "not placed");
    for n in ["aa1", "aa2"] {
        api.wait_phase(n, pb::VmPhase::Stopped, Duration::from_secs(400));
    }
    for n in ["aa1", "aa2"] {
        let head = text(&read_image(&ceph, &format!("{n}-disk-img"), 0, 512));
        assert_eq!(head, "BASALT-E2E-PATTERN run 1", "{n} ran on its host");
    }

    // Deleting a VM with its disks removes the image from Ceph.
    api.rt
        .block_on(c.delete_vm(pb::DeleteVmRequest { name: "writer".into(), delete_disks: true }))
        .expect("delete writer");
    api.eventually("writer's image removed", Duration::from_secs(120), |_| {
        (!image_exists(&ceph, "writer-disk-img")).then_some(())
    });
    assert!(api.volume("writer-disk").is_none(), "its volume record is gone");

    // Resilience: a VM keeps running while every controller is down.
    create("ticker", vm_spec(128, Some("ticker-disk"), "ticker", "")).expect("create ticker");
    api.wait_phase("ticker", pb::VmPhase::Running, Duration::from_secs(400));
    let ticks = || tick(&ceph, "ticker-disk-img").0;
    api.eventually("the ticker ticks", Duration::from_secs(120), |_| (ticks() > 0).then_some(()));

    // What only the host knows, through basaltctl and the agent's node service.
    let (rc, out, err) = basaltctl(&["-o", "json", "vm", "stats", "ticker"]);
    assert_eq!(rc, Some(0), "vm stats: {err}");
    let stats: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
    assert!(stats["serial_tx_bytes"].as_u64().unwrap_or(0) > 0, "the guest wrote to its console: {stats}");
    assert!(stats["vcpus"][0]["mmio_exits_handled"].as_u64().unwrap_or(0) > 0, "{stats}");
    let (rc, out, err) = basaltctl(&["vm", "stats", "ticker"]);
    assert!(rc == Some(0) && out.contains("serial_tx_bytes"), "vm stats as a table: {out} {err}");
    let (rc, out, err) = basaltctl(&["-o", "json", "vm", "vgic-state", "ticker"]);
    assert_eq!(rc, Some(0), "vm vgic-state: {err}");
    let gic: serde_json::Value = serde_json::from_str(&out).expect("vgic JSON");
    let irqs = gic["irqs"].as_array().cloned().unwrap_or_default();
    assert!(irqs.iter().any(|i| i["intid"] == 27), "the virtual timer's PPI 27 is in the vGIC state: {gic}");
    let (rc, out, err) = basaltctl(&["vm", "console", "ticker", "--tail", "2000"]);
    assert!(rc == Some(0) && out.contains("TICK "), "vm console shows the guest's output: {out} {err}");
    let (rc, _, err) = basaltctl(&["vm", "stats", "too-big"]);
    assert!(rc == Some(1) && err.contains("not placed"), "a pending VM has no host to ask: {rc:?} {err}");
    // The node service refuses what it does not offer, and names that are not VM names.
    let node = api.nodes().into_iter().find(|n| n.vms.iter().any(|v| v == "ticker")).expect("ticker's node");
    let mut ns_client = api
        .rt
        .block_on(basalt_proto::v1::node_service_client::NodeServiceClient::connect(format!("http://{}", node.address)))
        .expect("node service");
    for (vm, cmd) in [("ticker", "pause"), ("../../etc", "status"), ("ticker", "shutdown")] {
        let r = api.rt.block_on(ns_client.vm_control(pb::VmControlRequest { vm: vm.into(), command: cmd.into() }));
        assert_eq!(r.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument), "{vm} {cmd}");
    }
    assert!(ticks() > 0, "still running after those refusals");
    // The agent's own metrics, scraped over the bridge.
    let host = node.address.rsplit_once(':').map(|(h, _)| h.to_string()).expect("host:port");
    let metrics = scrape_metrics(&format!("{host}:9110")).expect("agent metrics");
    assert!(metrics.contains("basalt_agent_vms{phase=\"VM_PHASE_RUNNING\"} 1"), "{metrics}");
    assert!(metrics.contains("basalt_agent_controllers_up 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("basalt_agent_vmm_starts_total ")), "{metrics}");
    for id in ctl.ids() {
        ctl.stop(id);
    }
    let before = ticks();
    std::thread::sleep(Duration::from_secs(15));
    let after = ticks();
    assert!(after > before + 3, "the VM kept running with every controller down: {before} -> {after}");
    for id in ctl.ids() {
        ctl.restart(id);
    }
    api.rt.block_on(ctl.wait_leader(Duration::from_secs(60)));
    // Re-synced: both hosts Ready again, the VM Running where it was, and a
    // new request is acted on.
    api.eventually("both hosts Ready after the outage", Duration::from_secs(120), |a| {
        let n = a.nodes();
        (n.len() == 2 && n.iter().all(|n| n.state == pb::NodeState::Ready as i32)).then_some(())
    });
    let vm = api.wait_phase("ticker", pb::VmPhase::Running, Duration::from_secs(60));
    assert!(!vm.placement.is_empty());

    // The agent of the ticker's host restarts: the new one adopts the running VMM.
    let octet: usize = vm.placement.trim_start_matches("host-").parse().expect("host-N");
    let host_ix = usize::from(octet != 11);
    std::net::TcpStream::connect(format!("10.77.0.{octet}:7300")).expect("ask the host to restart its agent");
    assert!(hosts.0[host_ix].wait_for_console("AGENT-RESTART", Duration::from_secs(60)), "agent restarted");
    assert!(hosts.0[host_ix].wait_for_console("adopting the VMM", Duration::from_secs(60)), "the new agent adopted it");
    let before = ticks();
    std::thread::sleep(Duration::from_secs(4));
    assert!(ticks() > before, "the VM ran on through the agent's restart");
    assert_eq!(api.vm("ticker").and_then(|v| v.observed).map(|o| o.phase), Some(pb::VmPhase::Running as i32));

    // Live migration through basaltctl, to the other host and back: the
    // guest never restarts (its boot tag stays), its count never goes back,
    // and it keeps counting on the new host. The first one leaves from the
    // VMM the restarted agent adopted.
    let host_of = |vm: &str| api.vm(vm).map(|v| v.placement).unwrap_or_default();
    let other = |h: &str| if h == "host-11" { "host-12".to_string() } else { "host-11".to_string() };
    let ticker_tick = || tick(&ceph, "ticker-disk-img");
    let (_, boot) = ticker_tick();
    let mut seen = ticker_tick().0;
    let check_guest = |seen: &mut u64, what: &str| {
        let (n, b) = api.eventually(&format!("ticker counting on {what}"), Duration::from_secs(60), |_| {
            Some(ticker_tick()).filter(|t| t.0 > *seen + 1)
        });
        assert_eq!(b, boot, "{what}: the same boot of the guest writes (no restart)");
        *seen = n;
    };
    for round in 0..2 {
        let from = host_of("ticker");
        let to = other(&from);
        let args: Vec<&str> = if round == 0 {
            vec!["vm", "migrate", "ticker", "--to", &to, "--wait"]
        } else {
            vec!["vm", "migrate", "ticker", "--wait"] // the scheduler picks the only other host
        };
        let t = Instant::now();
        let (rc, out, err) = basaltctl(&args);
        assert_eq!(rc, Some(0), "vm migrate: {out} {err}");
        assert!(out.contains(&format!("moved from node {from} to node {to}")) && out.contains("downtime"), "{out}");
        eprintln!("[e2e] {} ({:.1?})", out.trim(), t.elapsed());
        let v = api.vm("ticker").expect("ticker");
        assert_eq!(v.placement, to, "placed on the target");
        let o = v.observed.unwrap_or_default();
        assert_eq!((o.phase, o.node.as_str()), (pb::VmPhase::Running as i32, to.as_str()), "{o:?}");
        assert!(v.migration.is_none(), "no migration in progress: {:?}", v.migration);
        check_guest(&mut seen, &format!("after moving to {to}"));
    }
    let (rc, out, err) = basaltctl(&["-o", "json", "migration", "list", "--vm", "ticker"]);
    assert_eq!(rc, Some(0), "migration list: {err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("migration list JSON");
    let list = list.as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 2, "{list:?}");
    assert!(
        list.iter().all(|m| m["phase"] == "COMPLETED" && m["downtime_ms"].as_u64().is_some_and(|d| d < 5000)),
        "both completed, downtime measured: {list:?}"
    );
    // Refusals that change nothing.
    let here = host_of("ticker");
    for (args, needle) in [
        (vec!["vm", "migrate", "aa1", "--to", "host-11"], "not running"),
        (vec!["vm", "migrate", "ticker", "--to", "host-99"], "node host-99"),
        (vec!["vm", "migrate", "ticker", "--to", here.as_str()], "already runs"),
        (vec!["vm", "migrate", "nope"], "vm nope"),
    ] {
        let (rc, _, err) = basaltctl(&args);
        assert!(rc == Some(1) && err.contains(needle), "{args:?}: {rc:?} {err}");
    }
    let (rc, _, err) = basaltctl(&["node", "cordon", &other(&here)]);
    assert_eq!(rc, Some(0), "{err}");
    let (rc, _, err) = basaltctl(&["vm", "migrate", "ticker", "--to", &other(&here)]);
    assert!(rc == Some(1) && err.contains("cordoned"), "a cordoned target: {rc:?} {err}");
    let (rc, _, err) = basaltctl(&["node", "uncordon", &other(&here)]);
    assert_eq!(rc, Some(0), "{err}");
    // A target without room for it: a VM there leaves it 64 MiB, the ticker needs 128.
    let target = api.nodes().into_iter().find(|n| n.id == other(&here)).expect("the other node");
    let free = target.capacity.unwrap_or_default().memory_mib - target.used.unwrap_or_default().memory_mib;
    let mut fat = vm_spec(free - 64, None, "ticker", "");
    fat.required_labels = [("host".to_string(), other(&here))].into();
    create("fat", fat).expect("create fat");
    api.eventually("fat placed", Duration::from_secs(60), |a| a.vm("fat").filter(|v| !v.placement.is_empty()));
    let (rc, _, err) = basaltctl(&["vm", "migrate", "ticker", "--to", &other(&here)]);
    assert!(rc == Some(1) && err.contains("memory"), "a target without room names memory: {rc:?} {err}");
    api.rt.block_on(c.delete_vm(pb::DeleteVmRequest { name: "fat".into(), delete_disks: false })).expect("delete fat");
    assert_eq!(host_of("ticker"), here, "refusals moved nothing");

    // A migration cancelled while it sends (held to 1 MiB/s): it ends
    // Cancelled, the VM stays where it was and its guest runs on.
    let (rc, out, err) = basaltctl(&["-o", "json", "vm", "migrate", "ticker", "--bandwidth", "1"]);
    assert_eq!(rc, Some(0), "vm migrate --bandwidth 1: {out} {err}");
    let id = serde_json::from_str::<serde_json::Value>(&out).expect("migration JSON")["id"].as_u64().expect("id");
    api.eventually("the slow migration sending", Duration::from_secs(60), |a| {
        a.vm("ticker")?.migration.filter(|m| m.phase == pb::MigrationPhase::Sending as i32)
    });
    let (rc, _, err) = basaltctl(&["vm", "migrate", "ticker"]);
    assert!(rc == Some(1) && err.contains("is migrating"), "a VM already migrating: {rc:?} {err}");
    // The source VMM's progress, as it goes through its first round.
    let shown = api.eventually("progress within the first round", Duration::from_secs(20), |_| {
        let (rc, out, _) = basaltctl(&["-o", "json", "migration", "show", &id.to_string()]);
        let shown: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| rc == Some(0))?;
        (shown["progress"]["role"] == "send" && shown["progress"]["bytes"].as_u64().is_some_and(|b| b > 0))
            .then_some(shown)
    });
    eprintln!("[e2e] a migration held to 1 MiB/s: {}", shown["progress"]);
    let (rc, _, err) = basaltctl(&["migration", "cancel", "ticker"]);
    assert_eq!(rc, Some(0), "migration cancel: {err}");
    let m = api.eventually("the migration cancelled", Duration::from_secs(60), |a| {
        let mut c = a.client.clone();
        let m = a.rt.block_on(c.get_migration(pb::GetMigrationRequest { id, allow_stale: false })).ok()?.into_inner();
        (m.phase != pb::MigrationPhase::Preparing as i32 && m.phase != pb::MigrationPhase::Sending as i32).then_some(m)
    });
    assert_eq!(m.phase, pb::MigrationPhase::Cancelled as i32, "{m:?}");
    assert_eq!(host_of("ticker"), here, "a cancelled migration leaves the VM where it was");
    check_guest(&mut seen, "after the cancelled migration");

    // Fault: the target's agent killed while the VM is sent to it. Its lease
    // runs out, the leader asks the source to stop, and the VM stays where it
    // was, the migration Failed naming the lost target. The agent comes
    // back (before the node is fenced), adopting its orphaned receiver.
    let migrate_json = |args: &[&str]| {
        let (rc, out, err) = basaltctl(args);
        assert_eq!(rc, Some(0), "{args:?}: {out} {err}");
        serde_json::from_str::<serde_json::Value>(&out).expect("migration JSON")["id"].as_u64().expect("id")
    };
    let get_migration = |a: &Api, id: u64| {
        let mut c = a.client.clone();
        a.rt.block_on(c.get_migration(pb::GetMigrationRequest { id, allow_stale: false })).ok().map(|m| m.into_inner())
    };
    let ended = |a: &Api, id: u64| {
        get_migration(a, id).filter(|m| {
            m.phase != pb::MigrationPhase::Preparing as i32 && m.phase != pb::MigrationPhase::Sending as i32
        })
    };
    let target = other(&here);
    let target_octet: u8 = target.trim_start_matches("host-").parse().expect("host-N");
    let id = migrate_json(&["-o", "json", "vm", "migrate", "ticker", "--bandwidth", "1"]);
    api.eventually("the migration sending", Duration::from_secs(60), |a| {
        get_migration(a, id).filter(|m| m.phase == pb::MigrationPhase::Sending as i32)
    });
    std::net::TcpStream::connect(format!("10.77.0.{target_octet}:7301")).expect("ask the target to kill its agent");
    let t = Instant::now();
    api.eventually(&format!("{target} Unreachable"), Duration::from_secs(60), |a| {
        a.nodes().into_iter().find(|n| n.id == target).filter(|n| n.state == pb::NodeState::Unreachable as i32)
    });
    std::net::TcpStream::connect(format!("10.77.0.{target_octet}:7300")).expect("ask the target to start its agent");
    let m = api.eventually("the migration to a lost target ended", Duration::from_secs(60), |a| ended(a, id));
    eprintln!("[e2e] migration to a lost target: {} after {:.1?}: {}", m.phase, t.elapsed(), m.reason);
    assert_eq!(m.phase, pb::MigrationPhase::Failed as i32, "{m:?}");
    assert!(m.reason.contains(&format!("target node {target} became")), "the reason names the lost target: {m:?}");
    assert_eq!(host_of("ticker"), here, "the VM stays on its source");
    check_guest(&mut seen, "after its target was lost");
    assert_eq!(lock_owners(&ceph, "ticker-disk-img").len(), 1, "one VMM holds the disk's lock");
    api.eventually(&format!("{target} Ready again"), Duration::from_secs(60), |a| {
        a.nodes().into_iter().find(|n| n.id == target).filter(|n| n.state == pb::NodeState::Ready as i32)
    });

    // Fault: the leader SIGKILLed while the VM is sent. The agents carry
    // the migration on and report to the next leader: it completes.
    let id = migrate_json(&["-o", "json", "vm", "migrate", "ticker", "--bandwidth", "4"]);
    api.eventually("the migration sending", Duration::from_secs(60), |a| {
        get_migration(a, id).filter(|m| m.phase == pb::MigrationPhase::Sending as i32)
    });
    let leader = api.rt.block_on(ctl.wait_leader(Duration::from_secs(10)));
    ctl.kill(leader);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    ctl.restart(leader);
    let m = api.eventually("the migration over a leader change ended", Duration::from_secs(120), |a| ended(a, id));
    eprintln!("[e2e] migration with the leader killed: {} after {:.1?}", m.phase, t.elapsed());
    assert_eq!(m.phase, pb::MigrationPhase::Completed as i32, "{m:?}");
    assert_eq!(host_of("ticker"), target, "placed on the target");
    check_guest(&mut seen, "after a migration across a leader change");
    assert_eq!(lock_owners(&ceph, "ticker-disk-img").len(), 1, "one VMM holds the disk's lock");
    let here = target;

    // Draining a host moves both of its running VMs.
    create("ticker2", vm_spec(128, Some("ticker2-disk"), "ticker", "")).expect("create ticker2");
    api.wait_phase("ticker2", pb::VmPhase::Running, Duration::from_secs(400));
    if host_of("ticker2") != here {
        let (rc, out, err) = basaltctl(&["vm", "migrate", "ticker2", "--to", &here, "--wait"]);
        assert_eq!(rc, Some(0), "bring ticker2 next to ticker: {out} {err}");
    }
    let t = Instant::now();
    let (rc, out, err) = basaltctl(&["node", "drain", &here]);
    assert_eq!(rc, Some(0), "node drain: {out} {err}");
    eprintln!("[e2e] drained {here} in {:.1?}:\n{}", t.elapsed(), out.trim());
    assert!(out.contains("moved   ticker:") && out.contains("moved   ticker2:"), "{out}");
    let away = other(&here);
    assert_eq!((host_of("ticker"), host_of("ticker2")), (away.clone(), away.clone()));
    check_guest(&mut seen, "after the drain");
    let metrics = ctl.scrape_metrics(api.rt.block_on(ctl.wait_leader(Duration::from_secs(10)))).expect("metrics");
    let completed = metrics
        .lines()
        .find_map(|l| l.strip_prefix("basalt_migrations_total{outcome=\"completed\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(completed.is_some_and(|n| n >= 4), "{metrics}");
    assert!(metrics.contains("basalt_migrations_total{outcome=\"cancelled\"} 1"), "{metrics}");
    assert!(metrics.contains("basalt_migration_downtime_seconds_count"), "{metrics}");
    let (rc, _, err) = basaltctl(&["node", "uncordon", &here]);
    assert_eq!(rc, Some(0), "{err}");
    api.power("ticker2", pb::Power::Stopped);
    api.wait_phase("ticker2", pb::VmPhase::Stopped, Duration::from_secs(120));
    // Deleted: a stopped VM keeps its reservation, and the failover below
    // needs room for an HA restart next to what the other host runs.
    api.rt
        .block_on(c.delete_vm(pb::DeleteVmRequest { name: "ticker2".into(), delete_disks: true }))
        .expect("delete ticker2");

    api.power("ticker", pb::Power::Stopped);
    let vm = api.wait_phase("ticker", pb::VmPhase::Stopped, Duration::from_secs(120));
    let stopped_at = ticks();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(ticks(), stopped_at, "the stopped VM no longer writes: {vm:?}");

    // Networks: two VMs on different hosts on one network get the addresses
    // the controllers gave them (by DHCP, from their VMMs), reach each other
    // over the hosts' VXLAN and move 64 MiB intact while the receiver
    // live-migrates to the sender's host; a VM on another network cannot
    // reach them even from an address in their subnet; deleting the VMs
    // removes their taps and, once unused, the network's devices.
    let netctl = |args: &[&str]| {
        let (rc, out, err) = basaltctl(args);
        assert_eq!(rc, Some(0), "basaltctl {args:?}: {out} {err}");
        out
    };
    netctl(&["network", "create", "e2e-a", "--cidr", "10.60.0.0/24"]);
    netctl(&["network", "create", "e2e-b", "--cidr", "10.61.0.0/24"]);
    // No anti-affinity group: nb must be free to move next to na. The label
    // puts na on the other host. nb has a disk: its RBD lock is what decides
    // a migration's outcome, so only VMs with one can move.
    let net_vm = |name: &str, net: &str, ip: &str, role: &str, on: Option<&str>, memory: u64| {
        let disk = (name == "nb").then_some("nb-disk");
        let mut spec = vm_spec(memory, disk, &format!("net {role}"), "");
        spec.nics = vec![pb::NicSpec { network: net.into(), ip: ip.into() }];
        spec.required_labels = on.map(|h| ("host".to_string(), h.to_string())).into_iter().collect();
        create(name, spec).unwrap_or_else(|e| panic!("create {name}: {e}"));
    };
    net_vm("nb", "e2e-a", "10.60.0.11", "basalt.net=recv", None, 128);
    api.wait_phase("nb", pb::VmPhase::Running, Duration::from_secs(400));
    let hb_ = host_of("nb");
    net_vm(
        "na",
        "e2e-a",
        "10.60.0.10",
        "basalt.net=send basalt.pace=2 basalt.peer=10.60.0.11",
        Some(&other(&hb_)),
        192,
    );
    api.wait_phase("na", pb::VmPhase::Running, Duration::from_secs(400));
    let ha_ = host_of("na");
    assert_ne!(ha_, hb_, "the two VMs run on different hosts");
    let console = |vm: &str| basaltctl(&["vm", "console", vm, "--tail", "20000"]).1;
    for (vm, ip) in [("na", "10.60.0.10"), ("nb", "10.60.0.11")] {
        let out = api.eventually(&format!("{vm} addressed"), Duration::from_secs(300), |_| {
            Some(console(vm)).filter(|o| o.contains("NET-UP ") || o.contains("DHCP-FAILED"))
        });
        assert!(out.contains(&format!("DHCP-BOUND {ip}/255.255.255.0 router=10.60.0.1 host={vm}")), "{vm}: {out}");
        assert!(out.contains(&format!("NET-UP {ip} mtu=1450 ip-arg={ip}")), "{vm}: {out}");
    }
    // The profile's tap RPS (every CPU) on the VMs' taps, read in each host.
    for (ix, octet) in [11u8, 12].into_iter().enumerate() {
        let before = hosts.0[ix].console().matches("TUNING ").count();
        std::net::TcpStream::connect(format!("10.77.0.{octet}:7302")).expect("ask the host for its tuning");
        let end = Instant::now() + Duration::from_secs(30);
        while hosts.0[ix].console().matches("TUNING ").count() == before && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(200));
        }
        let console = hosts.0[ix].console();
        let line = console.lines().filter(|l| l.contains("TUNING ")).last().unwrap_or_default().to_string();
        assert!(line.contains("taps=3,"), "host-{octet}'s VM tap has RPS on both CPUs: {line}");
    }
    // The receiver moves to the sender's host while the stream flows.
    api.eventually("na sends", Duration::from_secs(300), |_| {
        Some(()).filter(|_| console("na").contains("NET-SENDING"))
    });
    let t = Instant::now();
    let (rc, out, err) = basaltctl(&["vm", "migrate", "nb", "--to", &ha_, "--wait"]);
    assert_eq!(rc, Some(0), "nb migrates during the transfer: {out} {err}");
    eprintln!("[e2e] nb migrated to {ha_} in {:.1?} during the transfer", t.elapsed());
    assert_eq!(host_of("nb"), ha_);
    assert!(!console("na").contains("NET-SENT in"), "the stream was still flowing when the migration ended");
    // A whole checksum: the console may be read in the middle of its line.
    let md5 = |out: &str, tag: &str| {
        out.lines()
            .filter_map(|l| l.trim().strip_prefix(tag))
            .map(str::trim)
            .find(|m| m.len() == 32 && m.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(String::from)
    };
    let recv = api.eventually("nb received the stream", Duration::from_secs(600), |_| md5(&console("nb"), "NET-RECV "));
    eprintln!("[e2e] 64 MiB from {ha_}, to {hb_} then {ha_}, received {:.1?} after the migration began", t.elapsed());
    let na_out = console("na");
    let sent = md5(&na_out, "NET-SENT-MD5 ").expect("sender's checksum");
    eprintln!("[e2e] {}", na_out.lines().find(|l| l.contains("NET-SENT in")).unwrap_or("no NET-SENT line").trim());
    assert_eq!(recv, sent, "the stream arrived intact");
    assert!(na_out.contains("NET-PING-OK"), "{na_out}");
    let shown: serde_json::Value = serde_json::from_str(&netctl(&["-o", "json", "vm", "show", "na"])).expect("json");
    assert!(shown["nics"][0]["mac"].as_str().is_some_and(|m| m.starts_with("02:ba:5a:")), "{shown}");
    net_vm("nc", "e2e-b", "10.61.0.10", "basalt.net=probe basalt.peer=10.60.0.10", None, 128);
    let verdict = api.eventually("nc's probe", Duration::from_secs(400), |_| {
        let out = console("nc");
        ["NET-ISOLATED", "NET-LEAK"].into_iter().find(|v| out.contains(v))
    });
    assert_eq!(verdict, "NET-ISOLATED", "a VM on another network cannot reach e2e-a");
    let (rc, _, err) = basaltctl(&["network", "delete", "e2e-a"]);
    assert!(rc == Some(1) && err.contains("in use by vm"), "{err}");
    let vni_a = serde_json::from_str::<serde_json::Value>(&netctl(&["-o", "json", "network", "show", "e2e-a"]))
        .expect("json")["vni"]
        .as_u64()
        .expect("vni");
    for n in ["na", "nb", "nc"] {
        api.rt
            .block_on(c.delete_vm(pb::DeleteVmRequest { name: n.into(), delete_disks: false }))
            .unwrap_or_else(|e| panic!("delete {n}: {e}"));
    }
    for (ix, host) in [(0usize, "host-11"), (1, "host-12")] {
        assert!(
            hosts.0[ix].wait_for_console(
                &format!("removed: no longer used on this host device=bsn{vni_a}"),
                Duration::from_secs(60)
            ),
            "{host} removed the network's bridge"
        );
    }
    api.eventually("e2e-a deletable", Duration::from_secs(30), |a| {
        let mut c = a.client.clone();
        a.rt.block_on(c.delete_network(pb::NameRef { name: "e2e-a".into() })).ok()
    });
    netctl(&["network", "delete", "e2e-b"]);

    // Failover: the agent of an HA VM's host dies, its VMM writes on. After
    // the lease the node is Unreachable, after fence_after it is fenced out
    // of Ceph (blocklisted, locks broken), and the VM restarts on the other
    // host, counting on from its disk; the old VMM can no longer write.
    let mut ha = vm_spec(128, Some("ha-disk"), "ticker", "");
    ha.ha = true;
    create("ha", ha).expect("create ha");
    let vm = api.wait_phase("ha", pb::VmPhase::Running, Duration::from_secs(400));
    let old_host = vm.placement.clone();
    let old_octet: u8 = old_host.trim_start_matches("host-").parse().expect("host-N");
    let (_, first_boot) =
        api.eventually("ha ticks", Duration::from_secs(120), |_| Some(tick(&ceph, "ha-disk-img")).filter(|t| t.0 > 0));
    // A second HA VM leaves that host by live migration just before it is
    // lost: once moved, HA must not start it again when its old host is fenced.
    let mut ha2 = vm_spec(128, Some("ha2-disk"), "ticker", "");
    ha2.ha = true;
    create("ha2", ha2).expect("create ha2");
    api.wait_phase("ha2", pb::VmPhase::Running, Duration::from_secs(400));
    if host_of("ha2") != old_host {
        let (rc, out, err) = basaltctl(&["vm", "migrate", "ha2", "--to", &old_host, "--wait"]);
        assert_eq!(rc, Some(0), "bring ha2 next to ha: {out} {err}");
    }
    let (_, ha2_boot) = api
        .eventually("ha2 ticks", Duration::from_secs(120), |_| Some(tick(&ceph, "ha2-disk-img")).filter(|t| t.0 > 0));
    let (rc, out, err) = basaltctl(&["vm", "migrate", "ha2", "--wait"]);
    assert_eq!(rc, Some(0), "ha2 moves away: {out} {err}");
    let ha2_host = host_of("ha2");
    assert_ne!(ha2_host, old_host);
    std::net::TcpStream::connect(format!("10.77.0.{old_octet}:7301")).expect("ask the host to kill its agent");
    let old_ix = usize::from(old_octet != 11);
    assert!(hosts.0[old_ix].wait_for_console("AGENT-KILLED", Duration::from_secs(60)), "agent killed");
    let killed_at = Instant::now();
    let before = tick(&ceph, "ha-disk-img");
    std::thread::sleep(Duration::from_secs(3));
    let during = tick(&ceph, "ha-disk-img");
    assert!(during.0 > before.0 && during.1 == first_boot, "the orphaned VMM still writes: {before:?} -> {during:?}");
    api.eventually(&format!("{old_host} Fenced"), Duration::from_secs(120), |a| {
        a.nodes().into_iter().find(|n| n.id == old_host).filter(|n| n.state == pb::NodeState::Fenced as i32)
    });
    eprintln!("[e2e] {old_host} fenced {:.0?} after its agent died", killed_at.elapsed());
    let entry = format!("10.77.0.{old_octet}:0/0");
    let blocklist = admin_cluster(&ceph).blocklist().expect("blocklist");
    assert!(blocklist.iter().any(|e| e.addr == entry), "{entry} is on Ceph's blocklist: {blocklist:?}");
    let vm = api.wait_phase("ha", pb::VmPhase::Running, Duration::from_secs(400));
    assert!(!vm.placement.is_empty() && vm.placement != old_host, "restarted on the other host: {vm:?}");
    let (count, boot) = api.eventually("the restarted guest writes", Duration::from_secs(120), |_| {
        Some(tick(&ceph, "ha-disk-img")).filter(|t| t.1 != first_boot && t.0 > 0)
    });
    assert!(count > during.0, "it counted on from the disk ({} before, {count} now)", during.0);
    eprintln!("[e2e] ha restarted on {} {:.0?} after its agent died", vm.placement, killed_at.elapsed());
    // Only the new instance writes from now on, while the old VMM still runs.
    let mut last = count;
    for _ in 0..5 {
        std::thread::sleep(Duration::from_secs(1));
        let (n, b) = tick(&ceph, "ha-disk-img");
        assert_eq!(b, boot, "only the restarted VM writes the disk (the fenced one's writes are refused)");
        assert!(n >= last, "{n} after {last}");
        last = n;
    }
    assert!(last > count, "the restarted VM keeps counting");
    // The VM that moved away before the fence was not started again.
    let v = api.vm("ha2").expect("ha2");
    let o = v.observed.clone().unwrap_or_default();
    assert_eq!(
        (v.placement.as_str(), o.phase, o.node.as_str()),
        (ha2_host.as_str(), pb::VmPhase::Running as i32, ha2_host.as_str()),
        "{v:?}"
    );
    let (n2, b2) = tick(&ceph, "ha2-disk-img");
    assert_eq!(b2, ha2_boot, "ha2's guest is the one that migrated, not a restart: {n2}");
    assert_eq!(lock_owners(&ceph, "ha2-disk-img").len(), 1, "one VMM holds ha2's disk");
    // The operator cleans up the host (here: powers it off, orphaned VMM and
    // all) and brings the node back as Cordoned: the fence is lifted.
    let out = hosts.0.remove(old_ix).stop().expect("stop the fenced host");
    eprintln!("--- {} (fenced) console tail\n{}", out.name, tail(&out.console, 20));
    let (rc, _, err) = basaltctl(&["node", "cordon", &old_host]);
    assert_eq!(rc, Some(0), "cordon the fenced node: {err}");
    let admin = admin_cluster(&ceph);
    api.eventually("the fence lifted", Duration::from_secs(30), |_| {
        let l = admin.blocklist().ok()?;
        (!l.iter().any(|e| e.addr == entry)).then_some(())
    });
    // Back as Cordoned, with a full lease for its agent to return (this host
    // will not: it is fenced again after fence_after).
    let node = api.nodes().into_iter().find(|n| n.id == old_host).expect("node");
    assert_eq!(node.state, pb::NodeState::Cordoned as i32, "{node:?}");
    eprintln!("[e2e] done after {:.0?}", t0.elapsed());

    for h in hosts.0.drain(..) {
        let out = h.stop().expect("stop host");
        eprintln!("--- {} console tail\n{}", out.name, tail(&out.console, 30));
    }
    drop(ctl);
    ceph.stop().expect("stop Ceph");
}
