//! A Flight SQL client for the coordinator: run a statement, print the answer.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use confer_protocol::metadata;
use confer_protocol::release::ResultInfo;
use futures::TryStreamExt;
use tonic::transport::{Channel, Endpoint};

use crate::{ConnectArgs, QueryArgs};

/// How `confer query` prints results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An aligned table with a footer on privacy cost.
    Table,
    /// CSV with a header line.
    Csv,
    /// One JSON object per row.
    Json,
}

/// A connection to a coordinator.
pub struct Client {
    inner: FlightSqlServiceClient<Channel>,
    channel: Channel,
    token: Option<String>,
}

/// A statement's answer.
#[derive(Debug)]
pub struct Answer {
    /// Result schema (with confer metadata).
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
}

impl Client {
    /// Connects as `ConnectArgs` say: plaintext for http URLs, TLS for
    /// https (trusting `--ca`, presenting `--cert`/`--key` if given); the
    /// token, if any, is sent with every request.
    pub async fn connect_with(args: &ConnectArgs) -> anyhow::Result<Self> {
        let given = args
            .coordinator
            .as_deref()
            .ok_or_else(|| anyhow!("--coordinator <URL> (or CONFER_COORDINATOR) is required"))?;
        let url = if given.contains("://") {
            given.to_string()
        } else {
            format!("http://{given}")
        };
        let mut endpoint = Endpoint::from_shared(url.clone())
            .with_context(|| format!("{url} is not a valid coordinator URL"))?
            .connect_timeout(Duration::from_secs(10));
        if args.token.is_some() && !url.starts_with("https://") {
            let host = confer_transport::url_host(&url).unwrap_or_default();
            if !confer_transport::is_loopback_host(&host) {
                return Err(anyhow!(
                    "refusing to send a bearer token in plaintext to {host}: connect with https:// and \
                     --ca (the network CA certificate), or use a loopback address"
                ));
            }
        }
        if url.starts_with("https://") {
            let ca = args.ca.as_deref().ok_or_else(|| {
                anyhow!("an https coordinator needs --ca <network CA certificate> (or CONFER_CA)")
            })?;
            let identity = args.cert.as_deref().zip(args.key.as_deref());
            let tls = confer_transport::ClientTls::new(ca, identity)?;
            let host =
                confer_transport::url_host(&url).ok_or_else(|| anyhow!("{url} has no host"))?;
            endpoint = endpoint.tls_config(tls.for_host(&host))?;
        }
        let channel = endpoint.connect().await.map_err(|e| {
            let detail = format!("{e:?}");
            if detail.contains("certificate") {
                anyhow!(
                    "cannot reach the coordinator at {url}: {}",
                    confer_transport::tls::explain_handshake_error(&std::io::Error::other(detail))
                )
            } else {
                anyhow!("cannot reach the coordinator at {url}: {e}")
            }
        })?;
        let mut inner = FlightSqlServiceClient::new_from_inner(
            arrow_flight::flight_service_client::FlightServiceClient::new(channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024),
        );
        if let Some(t) = &args.token {
            inner.set_token(t.clone());
        }
        Ok(Self {
            inner,
            channel,
            token: args.token.clone(),
        })
    }

    /// Connects to a plaintext loopback coordinator with a token.
    pub async fn connect(url: &str, token: Option<&str>) -> anyhow::Result<Self> {
        Self::connect_with(&ConnectArgs {
            coordinator: Some(url.to_string()),
            token: token.map(str::to_string),
            ca: None,
            cert: None,
            key: None,
        })
        .await
    }

    /// Runs one statement, under `study` if given.
    pub async fn run(&mut self, sql: &str, study: Option<&str>) -> anyhow::Result<Answer> {
        if let Some(study) = study {
            self.inner
                .set_header(confer_protocol::coordinator::STUDY_HEADER, study);
        }
        let info = self
            .inner
            .execute(sql.to_string(), None)
            .await
            .map_err(explain)?;
        let schema = Arc::new(
            info.clone()
                .try_decode_schema()
                .map_err(|e| anyhow!("the coordinator sent an unreadable schema: {e}"))?,
        );
        let mut batches = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint
                .ticket
                .ok_or_else(|| anyhow!("the coordinator sent an endpoint without a ticket"))?;
            // A failure marked retryable (a node went away mid-query) is
            // retried with the same ticket: the same task, which nodes that
            // already answered serve from their ledgers at no charge. A new
            // statement would be a new task, charged again.
            let mut attempt = 0u32;
            let got = loop {
                let fetched = async {
                    let stream = self.inner.do_get(ticket.clone()).await?;
                    stream.try_collect::<Vec<RecordBatch>>().await
                }
                .await;
                match fetched {
                    Ok(got) => break got,
                    Err(FlightError::Tonic(status))
                        if attempt < FETCH_RETRIES
                            && confer_protocol::ProtocolError::from_status(&status).retryable =>
                    {
                        attempt += 1;
                        tracing::warn!(
                            attempt,
                            "retrying the same statement after: {}",
                            status.message()
                        );
                        tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
                    }
                    Err(e) => return Err(explain(e)),
                }
            };
            batches.extend(got);
        }
        let schema = batches.first().map(|b| b.schema()).unwrap_or(schema);
        Ok(Answer { schema, batches })
    }

    /// Runs a custom coordinator action and returns its JSON body.
    pub async fn action(&mut self, kind: &str, body: Vec<u8>) -> anyhow::Result<serde_json::Value> {
        // Answers (an exported model's weights) may exceed tonic's 4 MiB default.
        let mut client = arrow_flight::FlightClient::new_from_inner(
            arrow_flight::flight_service_client::FlightServiceClient::new(self.channel.clone())
                .max_decoding_message_size(64 * 1024 * 1024)
                .max_encoding_message_size(64 * 1024 * 1024),
        );
        if let Some(t) = &self.token {
            client
                .add_header("authorization", &format!("Bearer {t}"))
                .map_err(|e| anyhow!("bad token: {e}"))?;
        }
        let bodies: Vec<bytes::Bytes> = client
            .do_action(arrow_flight::Action::new(kind.to_string(), body))
            .await
            .map_err(explain)?
            .try_collect()
            .await
            .map_err(explain)?;
        let body = bodies
            .first()
            .ok_or_else(|| anyhow!("the coordinator returned nothing for {kind}"))?;
        Ok(serde_json::from_slice(body)?)
    }
}

/// Turns a Flight error into the message the server meant for the user.
fn explain(err: FlightError) -> anyhow::Error {
    match err {
        FlightError::Tonic(status) => anyhow!("{}", status.message()),
        other => anyhow!(other),
    }
}

/// `confer query`.
pub async fn query_command(args: QueryArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&args.connect).await?;
    let answer = client.run(&args.sql, args.study.as_deref()).await?;
    print!("{}", render(&answer, args.format)?);
    Ok(())
}

/// Renders an answer for a terminal or a file.
pub fn render(answer: &Answer, format: OutputFormat) -> anyhow::Result<String> {
    match format {
        OutputFormat::Table if answer.schema.metadata().contains_key(metadata::EXPLAIN) => {
            let mut out = String::new();
            for b in &answer.batches {
                let items = b.column(0).as_any().downcast_ref::<StringArray>();
                let values = b.column(1).as_any().downcast_ref::<StringArray>();
                let (Some(items), Some(values)) = (items, values) else {
                    return Err(anyhow!("EXPLAIN PRIVACY answer has unexpected columns"));
                };
                for (item, value) in items.iter().zip(values.iter()) {
                    let value = value.unwrap_or("").replace('\n', &format!("\n{:21}", ""));
                    out.push_str(&format!("{:<20} {value}\n", item.unwrap_or("")));
                }
            }
            Ok(out)
        }
        OutputFormat::Table => {
            let display: Vec<RecordBatch> = answer
                .batches
                .iter()
                .map(rounded_for_display)
                .collect::<anyhow::Result<_>>()?;
            let mut out = if display.is_empty() {
                String::from("(no rows)\n")
            } else {
                format!(
                    "{}\n",
                    arrow::util::pretty::pretty_format_batches(&display)?
                )
            };
            if let Some(footer) = footer(&answer.schema) {
                out.push_str(&footer);
                out.push('\n');
            }
            Ok(out)
        }
        OutputFormat::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut buf);
                for b in &answer.batches {
                    w.write(b)?;
                }
            }
            Ok(String::from_utf8(buf)?)
        }
        OutputFormat::Json => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                for b in &answer.batches {
                    w.write(b)?;
                }
                w.finish()?;
            }
            Ok(String::from_utf8(buf)?)
        }
    }
}

/// Floats shown with one decimal (interval ends), everything else as is.
fn rounded_for_display(batch: &RecordBatch) -> anyhow::Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        if field.data_type() == &DataType::Float64 {
            let floats = col
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| anyhow!("column {} is not Float64", field.name()))?;
            let interval = field.name().ends_with("_ci_low") || field.name().ends_with("_ci_high");
            let text: StringArray = (0..floats.len())
                .map(|i| {
                    floats
                        .is_valid(i)
                        .then(|| display_float(floats.value(i), interval))
                })
                .collect();
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(text));
        } else {
            fields.push(field.as_ref().clone());
            columns.push(col.clone());
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Interval ends with one decimal; other floats with up to six significant
/// digits, small ones in scientific notation.
fn display_float(v: f64, interval: bool) -> String {
    if interval {
        return format!("{v:.1}");
    }
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    if v.abs() < 1e-3 || v.abs() >= 1e9 {
        return format!("{v:e}");
    }
    let digits = (6 - v.abs().log10().floor() as i32 - 1).clamp(0, 12) as usize;
    let s = format!("{v:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A line on what the answer cost and where it came from.
pub fn footer(schema: &Schema) -> Option<String> {
    let info: ResultInfo = serde_json::from_str(schema.metadata().get(metadata::RESULT)?).ok()?;
    let c = info.cost_per_site;
    let cost = if c.delta > 0.0 {
        format!(
            "epsilon = {:.4}, delta = {:e} (rho = {:.4} zCDP)",
            c.epsilon, c.delta, c.rho
        )
    } else {
        format!("epsilon = {:.4} (pure DP)", c.epsilon)
    };
    let missing = schema
        .metadata()
        .get(metadata::MISSING_SITES)
        .map(|m| format!(" Missing (did not answer): {m}."))
        .unwrap_or_default();
    Some(format!(
        "{:.0}% confidence intervals. Cost at each site: {cost}. Sites: {}.{missing}",
        info.confidence * 100.0,
        info.sites.join(", ")
    ))
}

/// Further attempts at a statement whose failure is marked retryable.
pub const FETCH_RETRIES: u32 = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_display_readably() {
        assert_eq!(display_float(1320.1196, true), "1320.1");
        assert_eq!(display_float(0.024394, false), "0.024394");
        assert_eq!(display_float(1e-6, false), "1e-6");
        assert_eq!(display_float(1.5, false), "1.5");
        assert_eq!(display_float(9.87654321, false), "9.87654");
        assert_eq!(display_float(0.0, false), "0");
    }

    #[tokio::test]
    async fn a_token_never_travels_in_plaintext_beyond_this_machine() {
        for url in ["http://10.1.2.3:50051", "http://coordinator.example:50051"] {
            let err = Client::connect(url, Some("secret"))
                .await
                .err()
                .expect("refused");
            assert!(err.to_string().contains("plaintext"), "{err}");
        }
        use confer_transport::is_loopback_host;
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("::1"));
        assert!(is_loopback_host("localhost"));
        assert!(!is_loopback_host("10.0.0.1"));
    }
}
