//! `jobwire.v1.AuditService`: an admin reads its tenant's audit log (written by the auth layer,
//! [`super::auth`]).

use jobwire_proto::v1::{self as pb, audit_service_server::AuditService};
use tonic::{Request, Response, Status};

use super::{ApiError, convert, paging::PageRequest, tenant_of};
use crate::store::{AuditRow, Store};

const DEFAULT_PAGE_SIZE: i32 = 100;
const MAX_PAGE_SIZE: i32 = 1000;

pub struct AuditApi {
    store: Store,
}

impl AuditApi {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn event(row: AuditRow) -> pb::AuditEvent {
    pb::AuditEvent {
        id: row.id,
        time: Some(convert::timestamp(row.at)),
        key_id: row.key_id.map(|id| id.to_string()).unwrap_or_default(),
        key_name: row.key_name,
        method: row.method,
        request: convert::json_to_struct(&row.request.0),
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let tenant = tenant_of(&request)?;
        let req = request.get_ref();
        let paging = PageRequest::<i64, ()>::parse(
            req.page_size,
            &req.page_token,
            (),
            (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
        )?;
        let rows = self
            .store
            .list_audit(&tenant, paging.after, paging.limit())
            .await
            .map_err(ApiError::from)?;
        let candidates = rows.into_iter().map(event).collect();
        let (events, next_page_token) = paging.page(candidates, false, |e| Ok(e.id))?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events,
            next_page_token,
        }))
    }
}
