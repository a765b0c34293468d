//! The table store the mirror writes to: DynamoDB, or any server that speaks
//! its API, reached only through `aws-sdk-dynamodb`.
//!
//! Every table has the same two-part key: `k` (binary: a kind byte, then the
//! kind's key) and `s` (number: which part of a multi-item record). The
//! mirror uses only PutItem, BatchWriteItem, DeleteItem, GetItem, Query,
//! Scan, CreateTable and DescribeTable, with condition expressions, so it
//! runs against real DynamoDB and against emulators without transactions.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, DeleteRequest, KeySchemaElement, KeyType, PutRequest,
    ScalarAttributeType, TableStatus, WriteRequest,
};
use aws_sdk_dynamodb::Client;

use jfs_common::config::DynamoConfig;

pub type Item = HashMap<String, AttributeValue>;

/// Longest time one request to the table store may take, retries included.
/// A deposed mirror writer's requests are over after this long, which is
/// what the next writer waits before it starts (see `mirror`).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(4);

/// DynamoDB's BatchWriteItem limit.
const BATCH_ITEMS: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum TsError {
    /// A condition expression did not hold (someone else wrote first).
    #[error("conditional write refused: the item changed under us")]
    Conflict,
    #[error("table {0} does not exist")]
    NoTable(String),
    #[error("table store request failed: {0}")]
    Failed(String),
}

fn failed<E, R>(what: &str, e: SdkError<E, R>) -> TsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    // The service's code and message say what went wrong (throttled,
    // validation, ...); the SDK's Display says only "service error".
    let detail = match e.as_service_error() {
        Some(se) => format!(
            "{}: {}",
            se.code().unwrap_or("error"),
            se.message().unwrap_or("no message")
        ),
        None => format!("{}", aws_sdk_dynamodb::error::DisplayErrorContext(&e)),
    };
    TsError::Failed(format!("{what}: {detail}"))
}

pub struct TableStore {
    client: Client,
    /// For scans and restores: pages take longer than single writes.
    bulk: Client,
    prefix: String,
    ready: Mutex<HashSet<String>>,
}

impl TableStore {
    pub async fn connect(cfg: &DynamoConfig) -> TableStore {
        let client = build_client(cfg, WRITE_TIMEOUT, Duration::from_millis(1500)).await;
        let bulk = build_client(cfg, Duration::from_secs(60), Duration::from_secs(20)).await;
        TableStore {
            client,
            bulk,
            prefix: cfg.table_prefix.clone(),
            ready: Mutex::new(HashSet::new()),
        }
    }

    /// The table that holds the cluster-wide rows, the log and the watermark.
    pub fn cluster_table(&self) -> String {
        // Namespace names cannot contain '.', so this never collides.
        format!("{}cluster.meta", self.prefix)
    }

    pub fn namespace_table(&self, ns: &str) -> String {
        format!("{}{}", self.prefix, ns)
    }

    /// Creates the table if it does not exist and waits until it is usable.
    pub async fn ensure_table(&self, name: &str) -> Result<(), TsError> {
        if self.ready.lock().unwrap_or_else(|p| p.into_inner()).contains(name) {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            match self.client.describe_table().table_name(name).send().await {
                Ok(d) => {
                    if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                        self.ready
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(name.to_string());
                        return Ok(());
                    }
                }
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception()) =>
                {
                    self.create_table(name).await?;
                }
                Err(e) => return Err(failed(&format!("describing table {name}"), e)),
            }
            if tokio::time::Instant::now() > deadline {
                return Err(TsError::Failed(format!(
                    "table {name} did not become ACTIVE within 120 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn create_table(&self, name: &str) -> Result<(), TsError> {
        let attr = |n: &str, t| {
            AttributeDefinition::builder()
                .attribute_name(n)
                .attribute_type(t)
                .build()
                .map_err(|e| TsError::Failed(e.to_string()))
        };
        let key = |n: &str, t| {
            KeySchemaElement::builder()
                .attribute_name(n)
                .key_type(t)
                .build()
                .map_err(|e| TsError::Failed(e.to_string()))
        };
        let r = self
            .client
            .create_table()
            .table_name(name)
            .attribute_definitions(attr("k", ScalarAttributeType::B)?)
            .attribute_definitions(attr("s", ScalarAttributeType::N)?)
            .key_schema(key("k", KeyType::Hash)?)
            .key_schema(key("s", KeyType::Range)?)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await;
        match r {
            Ok(_) => {
                tracing::info!(table = name, "created mirror table");
                Ok(())
            }
            // Created by another node (or an earlier attempt) meanwhile.
            Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => Ok(()),
            Err(e) => Err(failed(&format!("creating table {name}"), e)),
        }
    }

    pub async fn get(&self, table: &str, k: &[u8], s: u64) -> Result<Option<Item>, TsError> {
        let r = self
            .client
            .get_item()
            .table_name(table)
            .key("k", bin(k))
            .key("s", num(s))
            .consistent_read(true)
            .send()
            .await;
        match r {
            Ok(o) => Ok(o.item),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception()) =>
            {
                Err(TsError::NoTable(table.to_string()))
            }
            Err(e) => Err(failed(&format!("reading from {table}"), e)),
        }
    }

    /// Puts `item`; with `condition`, only if it holds (else `Conflict`).
    pub async fn put(&self, table: &str, item: Item, condition: Option<Condition>) -> Result<(), TsError> {
        let mut req = self.client.put_item().table_name(table).set_item(Some(item));
        if let Some(c) = condition {
            req = req
                .condition_expression(c.expr)
                .set_expression_attribute_names((!c.names.is_empty()).then_some(c.names))
                .set_expression_attribute_values((!c.values.is_empty()).then_some(c.values));
        }
        match req.send().await {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(TsError::Conflict)
            }
            Err(e) => Err(failed(&format!("writing to {table}"), e)),
        }
    }

    /// Writes `ops` in 25-item batches, `parallel` at a time, retrying what
    /// the server leaves unprocessed (throttling) with backoff.
    pub async fn batch_write(&self, table: &str, ops: Vec<RowOp>, parallel: usize) -> Result<(), TsError> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let mut batches: Vec<Vec<WriteRequest>> = Vec::new();
        for chunk in ops.chunks(BATCH_ITEMS) {
            let mut b = Vec::with_capacity(chunk.len());
            for op in chunk {
                b.push(op.to_request()?);
            }
            batches.push(b);
        }
        stream::iter(batches.into_iter().map(|b| self.write_one_batch(table, b)))
            .buffer_unordered(parallel.max(1))
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    async fn write_one_batch(&self, table: &str, mut reqs: Vec<WriteRequest>) -> Result<(), TsError> {
        let mut pause = Duration::from_millis(20);
        let mut rounds = 0;
        while !reqs.is_empty() {
            let out = self
                .client
                .batch_write_item()
                .request_items(table, reqs)
                .send()
                .await
                .map_err(|e| failed(&format!("batch write to {table}"), e))?;
            reqs = out
                .unprocessed_items
                .and_then(|mut m| m.remove(table))
                .unwrap_or_default();
            if !reqs.is_empty() {
                rounds += 1;
                if rounds > 30 {
                    return Err(TsError::Failed(format!(
                        "{table} kept refusing {} items (throttled for too long)",
                        reqs.len()
                    )));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
        Ok(())
    }

    /// One segment of a parallel scan; `page` gets each page of items.
    pub async fn scan_segment(
        &self,
        table: &str,
        segment: i32,
        total: i32,
        mut page: impl FnMut(Vec<Item>) -> Result<(), TsError>,
    ) -> Result<(), TsError> {
        let mut start: Option<Item> = None;
        loop {
            let (items, next) = self.scan_page(table, segment, total, start.take()).await?;
            page(items)?;
            match next {
                Some(k) => start = Some(k),
                None => return Ok(()),
            }
        }
    }

    /// One page of one segment of a scan, and where the next page starts.
    pub async fn scan_page(
        &self,
        table: &str,
        segment: i32,
        total: i32,
        start: Option<Item>,
    ) -> Result<(Vec<Item>, Option<Item>), TsError> {
        let out = self
            .bulk
            .scan()
            .table_name(table)
            .segment(segment)
            .total_segments(total)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| failed(&format!("scanning {table}"), e))?;
        let next = out.last_evaluated_key.filter(|k| !k.is_empty());
        Ok((out.items.unwrap_or_default(), next))
    }

    /// Items with hash key `k` and sort key in `lo..=hi`, in order.
    pub async fn query(&self, table: &str, k: &[u8], lo: u64, hi: u64) -> Result<Vec<Item>, TsError> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let r = self
                .bulk
                .query()
                .table_name(table)
                .key_condition_expression("k = :k AND s BETWEEN :lo AND :hi")
                .expression_attribute_values(":k", bin(k))
                .expression_attribute_values(":lo", num(lo))
                .expression_attribute_values(":hi", num(hi))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| failed(&format!("querying {table}"), e))?;
            out.extend(r.items.unwrap_or_default());
            match r.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// The number of items in a table, as the store estimates it (DynamoDB
    /// refreshes this about every six hours; emulators count exactly).
    pub async fn item_count(&self, table: &str) -> Result<u64, TsError> {
        let d = self
            .client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| failed(&format!("describing {table}"), e))?;
        Ok(d.table().and_then(|t| t.item_count()).unwrap_or(0).max(0) as u64)
    }
}

async fn build_client(cfg: &DynamoConfig, op_timeout: Duration, attempt: Duration) -> Client {
    use aws_config::timeout::TimeoutConfig;
    use aws_config::{BehaviorVersion, Region};
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(1))
        .operation_attempt_timeout(attempt)
        .operation_timeout(op_timeout)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(cfg.region.clone()))
        .timeout_config(timeouts);
    if let Some(ep) = &cfg.endpoint {
        loader = loader.endpoint_url(ep);
    }
    if let (Some(key), Some(secret)) = (&cfg.access_key, &cfg.access_secret) {
        loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            key.clone(),
            secret.expose().to_string(),
            None,
            None,
            "jfs.toml",
        ));
    }
    Client::new(&loader.load().await)
}

/// A condition expression with its placeholders.
pub struct Condition {
    pub expr: String,
    pub names: HashMap<String, String>,
    pub values: HashMap<String, AttributeValue>,
}

/// One row write of a batch.
pub enum RowOp {
    Put(Item),
    Delete { k: Vec<u8>, s: u64 },
}

impl RowOp {
    fn to_request(&self) -> Result<WriteRequest, TsError> {
        let bad = |e: aws_sdk_dynamodb::error::BuildError| TsError::Failed(e.to_string());
        Ok(match self {
            RowOp::Put(item) => WriteRequest::builder()
                .put_request(
                    PutRequest::builder()
                        .set_item(Some(item.clone()))
                        .build()
                        .map_err(bad)?,
                )
                .build(),
            RowOp::Delete { k, s } => WriteRequest::builder()
                .delete_request(
                    DeleteRequest::builder()
                        .key("k", bin(k))
                        .key("s", num(*s))
                        .build()
                        .map_err(bad)?,
                )
                .build(),
        })
    }
}

pub fn bin(b: &[u8]) -> AttributeValue {
    AttributeValue::B(Blob::new(b.to_vec()))
}

pub fn num(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

pub fn text(s: &str) -> AttributeValue {
    AttributeValue::S(s.to_string())
}

pub fn get_bin<'a>(item: &'a Item, name: &str) -> Option<&'a [u8]> {
    match item.get(name) {
        Some(AttributeValue::B(b)) => Some(b.as_ref()),
        _ => None,
    }
}

pub fn get_num(item: &Item, name: &str) -> Option<u64> {
    match item.get(name) {
        Some(AttributeValue::N(n)) => n.parse().ok(),
        _ => None,
    }
}

pub fn get_text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s),
        _ => None,
    }
}
