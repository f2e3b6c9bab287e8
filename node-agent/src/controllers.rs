//! Reaching the controllers: any of them takes any call (followers forward to
//! the leader), so the agent keeps one channel to whichever answers and moves
//! to the next address in its list when calls through it fail.

use std::sync::Mutex;
use std::time::Duration;

use basalt_proto::v1::agent_service_client::AgentServiceClient;
use basalt_proto::v1::cluster_service_client::ClusterServiceClient;
use tonic::transport::{Channel, Endpoint};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Unary calls; the watch stream has no deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Controllers {
    addrs: Vec<String>,
    state: Mutex<Current>,
}

/// The channel in use (and its address's index), and where to start looking
/// once it fails.
#[derive(Default)]
struct Current {
    channel: Option<(usize, Channel)>,
    next: usize,
}

impl Controllers {
    pub fn new(addrs: Vec<String>) -> Self {
        Controllers { addrs, state: Mutex::new(Current::default()) }
    }

    /// A channel to a controller that accepted a connection, trying each
    /// address once, starting after the last one that failed.
    pub async fn channel(&self) -> Result<Channel, String> {
        let start = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, ch)) = &st.channel {
                return Ok(ch.clone());
            }
            st.next
        };
        let mut errors = Vec::new();
        for k in 0..self.addrs.len() {
            let i = (start + k) % self.addrs.len();
            let addr = &self.addrs[i];
            let ep = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("{addr}: {e}"))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                .tcp_nodelay(true);
            match ep.connect().await {
                Ok(ch) => {
                    self.state.lock().unwrap_or_else(|p| p.into_inner()).channel = Some((i, ch.clone()));
                    tracing::info!("connected to controller {addr}");
                    return Ok(ch);
                }
                Err(e) => errors.push(format!("{addr}: {e}")),
            }
        }
        Err(format!("no controller reachable ({})", errors.join("; ")))
    }

    /// The current controller failed a call: use the next one from now on.
    pub fn failed(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((i, _)) = st.channel.take() {
            st.next = (i + 1) % self.addrs.len().max(1);
        }
    }

    pub async fn agent(&self) -> Result<AgentServiceClient<Channel>, String> {
        Ok(AgentServiceClient::new(self.channel().await?))
    }

    pub async fn cluster(&self) -> Result<ClusterServiceClient<Channel>, String> {
        Ok(ClusterServiceClient::new(self.channel().await?))
    }
}

/// Errors that say "this controller could not serve the call" (as opposed to
/// a refusal of the request itself): worth trying another controller.
pub fn is_transport(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}
