//! Probes of the children. Shard readiness is a real gRPC `Health` call: a socket file only
//! says that something bound it, a Health answer says the model is loaded and the device works.
//! Shard liveness is an `Info` call, which the shard answers without waiting for the model, so
//! a shard busy with a long prefill still counts as alive and only a hung one does not. Router
//! readiness is any HTTP answer on its port.

use std::future::Future;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tessera_proto::{HealthRequest, InfoRequest};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// Runs `call` against the shard on `socket` and says whether it succeeded within `timeout`.
///
/// Each probe runs on its own short-lived runtime: dropping it closes the connection. A
/// connection left open on an idle runtime would keep the shard's graceful shutdown waiting.
fn probe<F, Fut>(socket: &Path, timeout: Duration, call: F) -> bool
where
    F: FnOnce(TextGenerationServiceClient<Channel>) -> Fut,
    Fut: Future<Output = bool>,
{
    if !socket.exists() {
        return false;
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    let socket: PathBuf = socket.to_path_buf();
    rt.block_on(async move {
        let attempt = async {
            let endpoint = Endpoint::try_from("http://[::]:50051").ok()?;
            let channel = endpoint
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?))
                    }
                }))
                .await
                .ok()?;
            Some(call(TextGenerationServiceClient::new(channel)).await)
        };
        matches!(tokio::time::timeout(timeout, attempt).await, Ok(Some(true)))
    })
}

/// Whether the shard on `socket` answers Health within two seconds.
pub fn shard_ready(socket: &Path) -> bool {
    probe(socket, Duration::from_secs(2), |mut c| async move {
        c.health(HealthRequest {}).await.is_ok()
    })
}

/// Whether the shard on `socket` answers Info within `timeout`.
pub fn shard_alive(socket: &Path, timeout: Duration) -> bool {
    probe(socket, timeout, |mut c| async move {
        c.info(InfoRequest {}).await.is_ok()
    })
}

/// Whether the router answers HTTP on its port (a wildcard `hostname` is probed on loopback).
pub fn router_serving(hostname: &str, port: u16) -> bool {
    let host = match hostname {
        "0.0.0.0" | "" => "127.0.0.1",
        "::" | "[::]" => "::1",
        other => other,
    };
    let timeout = Duration::from_millis(500);
    let Some(addr) = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let mut head = [0u8; 5];
    stream.write_all(request).is_ok() && stream.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}
