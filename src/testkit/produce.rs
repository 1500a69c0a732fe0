//! `towline.testkit.v1.Log`: a batch RPC (`Produce`, `repeated bytes records`) with per-record
//! results, sharing the backend's faults and counters.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tonic::{Code, Request, Response, Status};

use super::backend::Shared;
use super::pb::log_server::Log;
use super::pb::{ProduceRequest, ProduceResponse, RecordResult};

pub(super) struct LogService {
    pub(super) shared: Arc<Shared>,
}

#[tonic::async_trait]
impl Log for LogService {
    async fn produce(
        &self,
        request: Request<ProduceRequest>,
    ) -> Result<Response<ProduceResponse>, Status> {
        // Latency, injected failures and the call counter, as for Echo.
        self.shared.admit(request.metadata()).await?;
        let records = request.into_inner().records;
        let accepted = records.iter().filter(|r| !r.is_empty()).count() as u64;
        let mut offset = self.shared.records.fetch_add(accepted, Ordering::Relaxed);
        let results = records
            .iter()
            .map(|record| {
                if record.is_empty() {
                    RecordResult {
                        code: Code::InvalidArgument as i32,
                        message: "testkit: empty record".into(),
                        offset: 0,
                    }
                } else {
                    offset += 1;
                    RecordResult {
                        code: Code::Ok as i32,
                        message: String::new(),
                        offset: offset - 1,
                    }
                }
            })
            .collect();
        Ok(Response::new(ProduceResponse { results }))
    }
}
