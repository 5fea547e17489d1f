//! Test infrastructure between a coordinator and a real node: a TCP proxy
//! that can delay the node's answers (a slow hospital link), and a rogue
//! Flight server that answers tasks with garbage (a broken or malicious
//! node). Neither replaces confer code: the coordinator and the nodes under
//! test are the real processes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use confer_protocol::actions;
use confer_protocol::catalog::{CatalogInfo, Health};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Response, Status, Streaming};

/// A TCP proxy that can delay either direction.
pub struct Proxy {
    pub addr: SocketAddr,
    delay_down_ms: Arc<AtomicU64>,
    delay_up_ms: Arc<AtomicU64>,
}

/// Copies `from` to `to`, sleeping `delay` milliseconds before each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let d = delay.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

impl Proxy {
    /// Forwards connections on a fresh loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let delay_down_ms = Arc::new(AtomicU64::new(0));
        let delay_up_ms = Arc::new(AtomicU64::new(0));
        let (down, up) = (delay_down_ms.clone(), delay_up_ms.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (down, up) = (down.clone(), up.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let upstream = tokio::spawn(pump(cr, sw, up));
                    pump(sr, cw, down).await;
                    upstream.abort();
                });
            }
        });
        Proxy {
            addr,
            delay_down_ms,
            delay_up_ms,
        }
    }

    /// Delays every chunk the node sends by `ms` milliseconds.
    pub fn set_delay_down_ms(&self, ms: u64) {
        self.delay_down_ms.store(ms, Ordering::Relaxed);
    }

    /// Delays every chunk sent to the node by `ms` milliseconds.
    pub fn set_delay_up_ms(&self, ms: u64) {
        self.delay_up_ms.store(ms, Ordering::Relaxed);
    }
}

/// A Flight server that publishes a real catalog under its own name and
/// answers every task with a batch that fits nothing.
#[derive(Clone)]
pub struct RogueNode {
    catalog: CatalogInfo,
}

impl RogueNode {
    /// Serves on a fresh loopback port until the test ends.
    pub async fn start(mut catalog: CatalogInfo, name: &str) -> SocketAddr {
        catalog.node = name.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind rogue");
        let addr = listener.local_addr().expect("rogue addr");
        let service = FlightServiceServer::new(RogueNode { catalog });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr
    }
}

type Stream_<T> = BoxStream<'static, Result<T, Status>>;

#[tonic::async_trait]
impl FlightService for RogueNode {
    type HandshakeStream = Stream_<HandshakeResponse>;
    type ListFlightsStream = Stream_<FlightInfo>;
    type DoGetStream = Stream_<FlightData>;
    type DoPutStream = Stream_<PutResult>;
    type DoActionStream = Stream_<arrow_flight::Result>;
    type ListActionsStream = Stream_<ActionType>;
    type DoExchangeStream = Stream_<FlightData>;

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn do_get(&self, _: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        let schema = Arc::new(Schema::new(vec![Field::new(
            "garbage",
            DataType::Utf8,
            false,
        )]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec!["x"; 3]))],
        )
        .expect("batch");
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures::stream::iter([Ok(batch)]))
            .map_err(Status::from);
        Ok(Response::new(stream.boxed()))
    }
    async fn do_put(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("rogue"))
    }
    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        let body = match request.into_inner().r#type.as_str() {
            actions::CATALOG => serde_json::to_vec(&self.catalog),
            actions::HEALTH => serde_json::to_vec(&Health {
                audit: None,
                node: self.catalog.node.clone(),
                version: "rogue".into(),
                uptime_secs: 0,
                tables: self.catalog.tables.len(),
                time_ms: None,
            }),
            // It agrees to every query, then answers with garbage.
            actions::QUERY_CHECK => serde_json::to_vec(&confer_protocol::task::QueryCheck {
                audit: None,
                node: self.catalog.node.clone(),
                rho: 0.0,
                epsilon: 0.0,
                delta: 0.0,
                refused: None,
            }),
            _ => return Err(Status::invalid_argument("rogue")),
        }
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(
            futures::stream::iter([Ok(arrow_flight::Result::new(body))]).boxed(),
        ))
    }
    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        Err(Status::unimplemented("rogue"))
    }
}
