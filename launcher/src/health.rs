//! Shard readiness: a real gRPC `Health` call on the shard's socket. A socket file only says
//! that something bound it; a Health answer says the model is loaded and the device works.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tessera_proto::text_generation_service_client::TextGenerationServiceClient;
use tessera_proto::HealthRequest;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint, Uri};

/// Whether the shard on `socket` answers Health within two seconds.
///
/// Each probe runs on its own short-lived runtime: dropping it closes the connection. A
/// connection left open on an idle runtime would keep the shard's graceful shutdown waiting.
pub fn shard_ready(socket: &Path) -> bool {
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
        let call = async {
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
            TextGenerationServiceClient::new(channel)
                .health(HealthRequest {})
                .await
                .ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), call).await,
            Ok(Some(_))
        )
    })
}
