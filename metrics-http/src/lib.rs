//! `GET /metrics` for Basalt's daemons: the daemon renders its Prometheus text
//! at scrape time, this serves it over HTTP/1 (anything else gets a 404).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

/// Renders the exposition text at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serve `GET /metrics` (anything else: 404) until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, render: Render) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let render = render.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                            .body(Full::new(Bytes::from(render())))
                    } else {
                        hyper::Response::builder().status(404).body(Full::new(Bytes::from_static(b"try /metrics\n")))
                    };
                    Ok::<_, Infallible>(resp.unwrap_or_else(|_| hyper::Response::new(Full::new(Bytes::new()))))
                }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .expect("send");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_the_rendered_text_at_metrics_only() {
        let l = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let n = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let n2 = n.clone();
        let render: Render =
            Arc::new(move || format!("scrapes {}\n", n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1));
        let task = tokio::spawn(serve(l, render));
        let first = get(addr, "/metrics").await;
        assert!(first.starts_with("HTTP/1.1 200") && first.contains("scrapes 1"), "{first}");
        assert!(get(addr, "/metrics").await.contains("scrapes 2"), "rendered at each scrape");
        assert!(get(addr, "/other").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }
}
