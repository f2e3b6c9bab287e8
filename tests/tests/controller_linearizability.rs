//! Linearizability of the controllers' VM-spec API under leader crashes:
//! concurrent clients read, blind-write and compare-and-set VM specs through
//! all three controllers while the leader is SIGKILLed and restarted at random
//! points; the recorded history is checked with a Wing–Gong/Lowe checker
//! (`basalt_tests::linearizability`). The same history with one stale read
//! added must be rejected, so the check is known to be able to fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_proto::v1 as pb;
use basalt_tests::controllers::{ControllerCluster, Options};
use basalt_tests::linearizability::{
    check, CheckResult, Operation, RegisterInput, RegisterOutput, Versioned, VersionedRegister,
};
use tokio::sync::Mutex;
use tonic::Code;

const KEYS: [&str; 3] = ["k0", "k1", "k2"];
const CLIENTS: usize = 4;
const RUN: Duration = Duration::from_secs(14);

fn spec(value: u64) -> pb::VmSpec {
    pb::VmSpec {
        vcpus: 1,
        memory_mib: 128,
        boot: Some(pb::vm_spec::Boot::Kernel(pb::KernelBoot {
            kernel: "/boot/Image".into(),
            initrd: String::new(),
            cmdline: String::new(),
        })),
        labels: [("v".to_string(), value.to_string())].into(),
        ..Default::default()
    }
}

fn value_of(vm: &pb::Vm) -> Option<u64> {
    vm.spec.as_ref()?.labels.get("v")?.parse().ok()
}

/// Small deterministic RNG (xorshift64*), seeded per client.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type History = Vec<Operation<RegisterInput, RegisterOutput>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_spec_reads_writes_and_cas_stay_linearizable_while_the_leader_is_killed() {
    let c = ControllerCluster::start(3, Options::default());
    c.wait_leader(Duration::from_secs(30)).await;
    let ids = c.ids();
    let clients: Vec<_> = ids.iter().map(|id| c.client(*id)).collect();
    let start = Instant::now();
    let now = move || start.elapsed().as_nanos() as u64;
    let history: Arc<Mutex<History>> = Arc::new(Mutex::new(Vec::new()));

    // The keys exist before the concurrent part; their creation is in the history too.
    for (i, key) in KEYS.iter().enumerate() {
        let call = now();
        let mut cl = clients[i % clients.len()].clone();
        cl.create_vm(pb::CreateVmRequest {
            name: key.to_string(),
            spec: Some(spec(0)),
            desired_power: pb::Power::Stopped as i32,
        })
        .await
        .expect("create key");
        history.lock().await.push(Operation {
            client: 0,
            input: RegisterInput::Create { key: key.to_string(), value: 0 },
            output: Some(RegisterOutput::Created),
            call,
            ret: Some(now()),
        });
    }

    let deadline = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for client in 0..CLIENTS {
        let clients = clients.clone();
        let history = history.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((client as u64 + 1) * 0x1000_0001));
            let mut seq = 0u64;
            let mut last_gen = [1u64; KEYS.len()];
            let mut unknown = 0u32;
            while Instant::now() < deadline {
                let k = rng.below(KEYS.len() as u64) as usize;
                let key = KEYS[k].to_string();
                let mut cl = clients[rng.below(clients.len() as u64) as usize].clone();
                seq += 1;
                let value = (client as u64 + 1) * 1_000_000 + seq;
                let kind = rng.below(10);
                let call = now();
                let (input, output) = if kind < 4 {
                    let r = cl.get_vm(pb::GetRequest { name: key.clone(), allow_stale: false }).await;
                    let out = match r {
                        Ok(vm) => {
                            let vm = vm.into_inner();
                            last_gen[k] = vm.generation;
                            Some(RegisterOutput::Value(
                                value_of(&vm).map(|v| Versioned { generation: vm.generation, value: v }),
                            ))
                        }
                        Err(s) if s.code() == Code::NotFound => Some(RegisterOutput::Value(None)),
                        // A failed read changed nothing: leave it out of the history.
                        Err(_) => continue,
                    };
                    (RegisterInput::Read { key }, out)
                } else {
                    let cas = kind >= 7;
                    let expected = if cas { last_gen[k] } else { 0 };
                    let r = cl
                        .update_vm(pb::UpdateVmRequest {
                            name: key.clone(),
                            spec: Some(spec(value)),
                            expected_generation: expected,
                        })
                        .await;
                    let out = match r {
                        Ok(w) => {
                            last_gen[k] = w.get_ref().generation;
                            Some(RegisterOutput::Written { generation: w.into_inner().generation })
                        }
                        Err(s) if cas && s.code() == Code::FailedPrecondition => Some(RegisterOutput::CasFailed),
                        Err(s) if s.code() == Code::NotFound => Some(RegisterOutput::NotFound),
                        Err(_) => {
                            unknown += 1;
                            None
                        }
                    };
                    let input = if cas {
                        RegisterInput::Cas { key, expected_generation: expected, value }
                    } else {
                        RegisterInput::Write { key, value }
                    };
                    (input, out)
                };
                let ret = output.as_ref().map(|_| now());
                history.lock().await.push(Operation { client: client + 1, input, output, call, ret });
            }
            unknown
        }));
    }

    // Chaos: kill the leader by PID at random points, restart it a moment later.
    let mut c = c;
    let mut rng = Rng(0xdead_beef);
    let mut kills = 0;
    while Instant::now() + Duration::from_secs(4) < deadline {
        tokio::time::sleep(Duration::from_millis(1500 + rng.below(1500))).await;
        let leader = c.wait_leader(Duration::from_secs(30)).await;
        c.kill(leader);
        kills += 1;
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1500))).await;
        c.restart(leader);
    }
    let mut unknown = 0;
    for t in tasks {
        unknown += t.await.expect("client task");
    }
    let history = Arc::try_unwrap(history).expect("history").into_inner();
    let writes = history.iter().filter(|o| !matches!(o.input, RegisterInput::Read { .. })).count();
    eprintln!("{} operations ({writes} writes, {unknown} with unknown outcome), {kills} leader kills", history.len());
    assert!(kills >= 2, "the chaos loop killed only {kills} leaders");
    assert!(history.len() > 100, "too few operations to mean anything: {}\n{}", history.len(), c.logs());

    let verdict = check(&VersionedRegister, &history);
    assert_eq!(verdict, CheckResult::Ok, "{verdict}");

    // Negative control on the real history: a read after everything, returning
    // a key's first version although it was overwritten, must be rejected.
    let key = KEYS
        .iter()
        .find(|k| {
            history.iter().any(|o| {
                matches!(&o.input, RegisterInput::Write { key, .. } | RegisterInput::Cas { key, .. } if key == *k)
                    && matches!(o.output, Some(RegisterOutput::Written { .. }))
            })
        })
        .expect("a key that was overwritten");
    let end = history.iter().filter_map(|o| o.ret).max().unwrap_or(0) + 1;
    let mut stale = history.clone();
    stale.push(Operation {
        client: 99,
        input: RegisterInput::Read { key: key.to_string() },
        output: Some(RegisterOutput::Value(Some(Versioned { generation: 1, value: 0 }))),
        call: end,
        ret: Some(end + 1),
    });
    let verdict = check(&VersionedRegister, &stale);
    assert!(matches!(verdict, CheckResult::Illegal { key: ref k, .. } if k == key), "stale read not caught: {verdict}");
}
