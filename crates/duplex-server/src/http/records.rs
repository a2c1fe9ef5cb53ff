//! The records API: JSON records in named collections, with REST CRUD, conditional requests
//! (`ETag`, `If-None-Match`, `If-Match`) and keyset pagination.

use axum::Router;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::{AppState, HttpCaller};
use crate::hub::namespace::Access;
use crate::store::{
    Change, CollectionSummary, CursorKey, FieldFilter, ListQuery, Precondition, Record, SortOrder,
    is_valid_collection, is_valid_field, is_valid_id,
};

/// Records listed when the client names no `limit`.
pub const DEFAULT_LIMIT: u32 = 50;
/// The largest `limit` a client may ask for.
pub const MAX_LIMIT: u32 = 500;
/// The most `filter.*` parameters in one listing.
pub const MAX_FILTERS: usize = 16;

const JSON: &str = super::JSON;
const MERGE_PATCH_JSON: &str = "application/merge-patch+json";

/// The records routes.
pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/collections", get(list_collections))
        .route(
            "/api/collections/{collection}/records",
            get(list_records).post(create_record),
        )
        .route(
            "/api/collections/{collection}/records/{id}",
            get(get_record)
                .put(replace_record)
                .patch(patch_record)
                .delete(delete_record),
        )
}

/// `GET /api/collections` body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CollectionList {
    items: Vec<CollectionItem>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct CollectionItem {
    name: String,
    records: u64,
}

impl From<CollectionSummary> for CollectionItem {
    fn from(summary: CollectionSummary) -> Self {
        CollectionItem {
            name: summary.name,
            records: summary.records,
        }
    }
}

/// Lists collections with their record counts.
#[utoipa::path(get, path = "/api/collections", tag = "records",
    responses((status = 200, description = "Collections that hold records", body = CollectionList)))]
pub(crate) async fn list_collections(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<axum::Json<CollectionList>, ApiError> {
    let caller = HttpCaller::from_headers(&state, &headers)?;
    let items = state.store.collections().await?;
    let namespaces = &state.hub.namespaces();
    Ok(axum::Json(CollectionList {
        items: items
            .into_iter()
            .filter(|c| {
                let channel = format!("records:{}", c.name);
                namespaces
                    .collection(&c.name)
                    .read
                    .allows(caller.as_caller(), &channel)
            })
            .map(CollectionItem::from)
            .collect(),
    }))
}

/// Reading or writing a collection's records.
#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
}

/// Applies the collection's `read` or `write` rule to the caller named by `Authorization`.
fn authorize(
    state: &AppState,
    headers: &HeaderMap,
    collection: &str,
    op: Op,
) -> Result<(), ApiError> {
    let caller = HttpCaller::from_headers(state, headers)?;
    let rule = state.hub.namespaces().collection(collection);
    let (access, verb) = match op {
        Op::Read => (rule.read, "read"),
        Op::Write => (rule.write, "write"),
    };
    // Only a token's channel list needs the channel's name spelled out.
    let channel = match access {
        Access::TokenChannels => format!("records:{collection}"),
        _ => String::new(),
    };
    if access.allows(caller.as_caller(), &channel) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "this collection's records are not yours to {verb} (rule: {access:?})"
        )))
    }
}

/// Creates a record; the server assigns `id`, `created`, `updated` and `version`.
#[utoipa::path(post, path = "/api/collections/{collection}/records", tag = "records",
    params(("collection" = String, Path, description = "[a-z0-9_-]{1,64}")),
    request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 201, description = "Created; Location and ETag set", body = Object),
        (status = 400, description = "Bad JSON or collection name", body = super::error::Problem),
        (status = 413, description = "Body over the limit", body = super::error::Problem),
        (status = 415, description = "Not application/json", body = super::error::Problem),
        (status = 422, description = "Not a JSON object", body = super::error::Problem)))]
pub(crate) async fn create_record(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path(collection) = path?;
    check_collection(&collection)?;
    authorize(&state, &headers, &collection, Op::Write)?;
    let fields = read_object(&state, &headers, body, &[JSON])?;
    let record = state.store.create(&collection, fields).await?;
    Ok(created(&collection, &record))
}

/// Reads one record; `If-None-Match` answers 304 when the client's copy is current.
#[utoipa::path(get, path = "/api/collections/{collection}/records/{id}", tag = "records",
    params(("collection" = String, Path), ("id" = String, Path)),
    responses(
        (status = 200, description = "The record, with its ETag", body = Object),
        (status = 304, description = "The client's copy is current"),
        (status = 404, description = "No such record", body = super::error::Problem)))]
pub(crate) async fn get_record(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    // The request rather than a `HeaderMap`, which axum clones whole.
    let headers = request.headers();
    let Path((collection, id)) = path?;
    check_collection(&collection)?;
    authorize(&state, headers, &collection, Op::Read)?;
    check_id(&id)?;
    let record = state
        .store
        .get(&collection, &id)
        .await?
        .ok_or_else(ApiError::record_not_found)?;
    if if_none_match_hits(headers, record.version)? {
        return Ok((StatusCode::NOT_MODIFIED, etag_header(&record)).into_response());
    }
    Ok(record_response(StatusCode::OK, &record))
}

/// Replaces a record's fields. `If-Match` guards against lost updates; `If-None-Match: *`
/// creates the record with this id instead.
#[utoipa::path(put, path = "/api/collections/{collection}/records/{id}", tag = "records",
    params(("collection" = String, Path), ("id" = String, Path)),
    request_body(content = Object, content_type = "application/json"),
    responses(
        (status = 200, description = "Replaced", body = Object),
        (status = 201, description = "Created (with If-None-Match: *)", body = Object),
        (status = 404, description = "No such record", body = super::error::Problem),
        (status = 409, description = "Created concurrently", body = super::error::Problem),
        (status = 412, description = "The version moved on", body = super::error::Problem)))]
pub(crate) async fn replace_record(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((collection, id)) = path?;
    check_collection(&collection)?;
    authorize(&state, &headers, &collection, Op::Write)?;
    check_id(&id)?;
    let fields = read_object(&state, &headers, body, &[JSON])?;
    let precondition = write_precondition(&headers)?;
    if precondition == Precondition::Absent {
        let record = state.store.create_with_id(&collection, &id, fields).await?;
        return Ok(created(&collection, &record));
    }
    let record = state
        .store
        .update(&collection, &id, Change::Replace(fields), &precondition)
        .await?;
    Ok(record_response(StatusCode::OK, &record))
}

/// Applies a JSON merge patch (RFC 7396) to a record.
#[utoipa::path(patch, path = "/api/collections/{collection}/records/{id}", tag = "records",
    params(("collection" = String, Path), ("id" = String, Path)),
    request_body(content = Object, content_type = "application/merge-patch+json"),
    responses(
        (status = 200, description = "Patched", body = Object),
        (status = 404, description = "No such record", body = super::error::Problem),
        (status = 412, description = "The version moved on", body = super::error::Problem)))]
pub(crate) async fn patch_record(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Path((collection, id)) = path?;
    check_collection(&collection)?;
    authorize(&state, &headers, &collection, Op::Write)?;
    check_id(&id)?;
    let patch = read_json(&state, &headers, body, &[MERGE_PATCH_JSON, JSON])?;
    let precondition = write_precondition(&headers)?;
    if precondition == Precondition::Absent {
        return Err(ApiError::InvalidHeader(
            "If-None-Match: * creates records with PUT, not PATCH".into(),
        ));
    }
    let record = state
        .store
        .update(&collection, &id, Change::MergePatch(patch), &precondition)
        .await?;
    Ok(record_response(StatusCode::OK, &record))
}

/// Deletes a record (`If-Match` honoured).
#[utoipa::path(delete, path = "/api/collections/{collection}/records/{id}", tag = "records",
    params(("collection" = String, Path), ("id" = String, Path)),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "No such record", body = super::error::Problem),
        (status = 412, description = "The version moved on", body = super::error::Problem)))]
pub(crate) async fn delete_record(
    State(state): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path((collection, id)) = path?;
    check_collection(&collection)?;
    authorize(&state, &headers, &collection, Op::Write)?;
    check_id(&id)?;
    let precondition = write_precondition(&headers)?;
    if precondition == Precondition::Absent {
        return Err(ApiError::InvalidHeader(
            "If-None-Match: * cannot guard a delete".into(),
        ));
    }
    state.store.delete(&collection, &id, &precondition).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Lists a collection: `limit`, `cursor`, `sort`, `filter.{field}`.
#[utoipa::path(get, path = "/api/collections/{collection}/records", tag = "records",
    params(
        ("collection" = String, Path),
        ("limit" = Option<u32>, Query, description = "1 to 500, default 50"),
        ("cursor" = Option<String>, Query, description = "`next` of the previous page"),
        ("sort" = Option<String>, Query, description = "created, -created, updated or -updated"),
        ("filter.{field}" = Option<String>, Query, description = "equality on a top-level field")),
    responses(
        (status = 200, description = "`{ items, next }`", body = Object),
        (status = 400, description = "Bad parameter", body = super::error::Problem)))]
pub(crate) async fn list_records(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, ApiError> {
    let headers = request.headers();
    let query = request.uri().query();
    let Path(collection) = path?;
    check_collection(&collection)?;
    authorize(&state, headers, &collection, Op::Read)?;
    let query = parse_list_query(query.unwrap_or(""), &state.cursors, &collection)?;
    let page = state.store.list(&collection, &query).await?;

    // The items are stored JSON documents: splice them in rather than decode and re-encode.
    let size = page.items.iter().map(Bytes::len).sum::<usize>() + page.items.len() + 64;
    let mut body = Vec::with_capacity(size);
    body.extend_from_slice(b"{\"items\":[");
    for (i, item) in page.items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"],\"next\":");
    match page.next {
        Some(cursor) => {
            // base64url text: nothing to escape.
            let sealed = state.cursors.seal(&cursor, &collection, &query.filters);
            body.push(b'"');
            body.extend_from_slice(sealed.as_bytes());
            body.push(b'"');
        }
        None => body.extend_from_slice(b"null"),
    }
    body.push(b'}');
    Ok(([(header::CONTENT_TYPE, JSON)], body).into_response())
}

/// Reads a listing's parameters; a cursor must be one this server sealed for this very
/// listing (collection, sort and filters).
pub(super) fn parse_list_query(
    query: &str,
    cursors: &CursorKey,
    collection: &str,
) -> Result<ListQuery, ApiError> {
    let mut list = ListQuery {
        limit: DEFAULT_LIMIT,
        ..ListQuery::default()
    };
    let mut cursor = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "limit" => {
                list.limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::InvalidQuery(format!(
                            "limit must be a whole number from 1 to {MAX_LIMIT}, not {value:?}"
                        ))
                    })?;
            }
            "sort" => {
                list.order = SortOrder::parse(&value).ok_or_else(|| {
                    ApiError::InvalidQuery(format!(
                        "sort must be created, -created, updated or -updated, not {value:?}"
                    ))
                })?;
            }
            "cursor" => cursor = Some(value.into_owned()),
            other => match other.strip_prefix("filter.") {
                Some(field) if is_valid_field(field) => {
                    if list.filters.len() == MAX_FILTERS {
                        return Err(ApiError::InvalidQuery(format!(
                            "at most {MAX_FILTERS} filters"
                        )));
                    }
                    list.filters.push(FieldFilter {
                        field: field.to_owned(),
                        value: value.into_owned(),
                    });
                }
                Some(field) => {
                    return Err(ApiError::InvalidQuery(format!(
                        "filter field {field:?} must be 1 to 64 of A-Z, a-z, 0-9 and '_'"
                    )));
                }
                None => {
                    return Err(ApiError::InvalidQuery(format!(
                        "unknown parameter {other:?}: expected limit, cursor, sort or filter.FIELD"
                    )));
                }
            },
        }
    }
    if let Some(text) = cursor {
        let cursor = cursors
            .open(&text, collection, &list.filters)
            .ok_or_else(|| {
                ApiError::InvalidQuery(
                    "cursor is not one this server issued for this listing (collection and filters)"
                        .into(),
                )
            })?;
        if cursor.order != list.order {
            return Err(ApiError::InvalidQuery(
                "cursor was issued for another sort order".into(),
            ));
        }
        list.after = Some(cursor);
    }
    Ok(list)
}

fn check_collection(collection: &str) -> Result<(), ApiError> {
    if is_valid_collection(collection) {
        Ok(())
    } else {
        Err(ApiError::InvalidCollection)
    }
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::InvalidId)
    }
}

/// Reads a body that must be a JSON object.
fn read_object(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    accepted: &[&'static str],
) -> Result<Map<String, Value>, ApiError> {
    match read_json(state, headers, body, accepted)? {
        Value::Object(fields) => Ok(fields),
        other => Err(ApiError::Validation(format!(
            "the body must be a JSON object, not {}",
            json_kind(&other)
        ))),
    }
}

/// Reads a JSON body whose media type is one of `accepted`.
fn read_json(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    accepted: &[&'static str],
) -> Result<Value, ApiError> {
    super::check_media_type(headers, accepted)?;
    let body = super::body_bytes(state, body)?;
    let value = serde_json::from_slice(&body).map_err(|e| ApiError::BadJson(e.to_string()))?;
    // A number serde_json would keep as another value is refused, never silently changed.
    crate::store::check_numbers(&body).map_err(ApiError::Validation)?;
    Ok(value)
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The precondition `If-Match` / `If-None-Match` put on a write.
fn write_precondition(headers: &HeaderMap) -> Result<Precondition, ApiError> {
    if let Some(value) = headers.get(header::IF_NONE_MATCH) {
        return match value.to_str().map(str::trim) {
            Ok("*") => Ok(Precondition::Absent),
            _ => Err(ApiError::InvalidHeader(
                "on a write, If-None-Match may only be *".into(),
            )),
        };
    }
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(Precondition::None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::InvalidHeader("If-Match is not ASCII".into()))?
        .trim();
    if text == "*" {
        return Ok(Precondition::Exists);
    }
    // Strong comparison (RFC 9110 §13.1.1): weak tags never match, so they are skipped.
    let mut versions = Vec::new();
    for tag in parse_entity_tags(text, "If-Match")? {
        if let EntityTag::Strong(opaque) = tag
            && let Ok(version) = opaque.parse()
        {
            versions.push(version);
        }
    }
    Ok(Precondition::VersionIn(versions))
}

/// Whether `If-None-Match` names the current version (weak comparison, RFC 9110 §13.1.2).
fn if_none_match_hits(headers: &HeaderMap, version: i64) -> Result<bool, ApiError> {
    let Some(value) = headers.get(header::IF_NONE_MATCH) else {
        return Ok(false);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::InvalidHeader("If-None-Match is not ASCII".into()))?
        .trim();
    if text == "*" {
        return Ok(true);
    }
    let current = version.to_string();
    Ok(parse_entity_tags(text, "If-None-Match")?
        .into_iter()
        .any(|tag| match tag {
            EntityTag::Strong(opaque) | EntityTag::Weak(opaque) => opaque == current,
        }))
}

#[derive(Debug, PartialEq, Eq)]
enum EntityTag<'a> {
    Strong(&'a str),
    Weak(&'a str),
}

fn parse_entity_tags<'a>(text: &'a str, header_name: &str) -> Result<Vec<EntityTag<'a>>, ApiError> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (weak, quoted) = match part.strip_prefix("W/") {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            let opaque = quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .filter(|o| !o.contains('"'))
                .ok_or_else(|| {
                    ApiError::InvalidHeader(format!(
                        "{header_name} must be * or entity tags such as \"3\", not {text:?}"
                    ))
                })?;
            Ok(if weak {
                EntityTag::Weak(opaque)
            } else {
                EntityTag::Strong(opaque)
            })
        })
        .collect()
}

fn etag_header(record: &Record) -> [(header::HeaderName, HeaderValue); 1] {
    [(
        header::ETAG,
        HeaderValue::from_str(&record.etag()).expect("a quoted integer is a valid header"),
    )]
}

fn record_response(status: StatusCode, record: &Record) -> Response {
    (
        status,
        etag_header(record),
        [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
        record.document.clone(),
    )
        .into_response()
}

fn created(collection: &str, record: &Record) -> Response {
    let mut response = record_response(StatusCode::CREATED, record);
    let location = format!("/api/collections/{collection}/records/{}", record.id);
    response.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("validated names are valid header text"),
    );
    response
}

#[cfg(test)]
mod tests;
