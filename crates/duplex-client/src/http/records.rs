//! Records over HTTP: one collection's create, get, replace, patch (with `If-Match`), delete,
//! and listing page by page or as a stream.

use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use hyper::Method;
use hyper::header;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Auth, Call, Client};
use crate::error::Error;

/// A record: the server's fields (`id`, `created`, `updated`, `version`) and yours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The record's id, unique in its collection.
    pub id: String,
    /// When it was created (RFC 3339).
    pub created: String,
    /// When it last changed (RFC 3339).
    pub updated: String,
    /// Starts at 1 and grows by one on every write; the `ETag` and `If-Match` value.
    pub version: u64,
    /// Everything else in the record.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Page {
    /// The records of this page.
    pub items: Vec<Record>,
    /// The cursor of the next page, `None` on the last.
    pub next: Option<String>,
}

/// How to list a collection.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Records per page (1 to 500; the server's default is 50).
    pub limit: Option<u32>,
    /// `created`, `-created`, `updated` or `-updated`.
    pub sort: Option<String>,
    /// Equality filters on top-level fields: `("status", "open")`.
    pub filters: Vec<(String, String)>,
    /// Where to start: the `next` of a previous page.
    pub cursor: Option<String>,
}

/// The records of one collection; from [`Client::records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    client: &'a Client,
    collection: String,
}

fn if_match(call: Call, version: Option<u64>) -> Call {
    match version {
        Some(version) => call.header(header::IF_MATCH, format!("\"{version}\"")),
        None => call,
    }
}

impl<'a> Records<'a> {
    pub(super) fn new(client: &'a Client, collection: &str) -> Records<'a> {
        Records {
            client,
            collection: collection.to_owned(),
        }
    }

    fn path(&self, id: Option<&str>) -> String {
        match id {
            Some(id) => format!("api/collections/{}/records/{id}", self.collection),
            None => format!("api/collections/{}/records", self.collection),
        }
    }

    /// Creates a record from a JSON object; the server assigns its id and version.
    pub async fn create(&self, fields: &impl Serialize) -> Result<Record, Error> {
        let request = self
            .client
            .request(Method::POST, &self.path(None), Auth::KeyOrToken)?
            .json(fields)?;
        self.client.send_json(request).await
    }

    /// Reads one record ([`Error::Api`] with code `not_found` when there is none).
    pub async fn get(&self, id: &str) -> Result<Record, Error> {
        let request = self
            .client
            .request(Method::GET, &self.path(Some(id)), Auth::KeyOrToken)?;
        self.client.send_json(request).await
    }

    /// Replaces a record's fields; with `if_version`, only if the record is still at that
    /// version (else code `precondition_failed`).
    pub async fn replace(
        &self,
        id: &str,
        fields: &impl Serialize,
        if_version: Option<u64>,
    ) -> Result<Record, Error> {
        let request = self
            .client
            .request(Method::PUT, &self.path(Some(id)), Auth::KeyOrToken)?
            .json(fields)?;
        self.client.send_json(if_match(request, if_version)).await
    }

    /// Applies a JSON merge patch (RFC 7396): `null` removes a field.
    pub async fn patch(
        &self,
        id: &str,
        patch: &impl Serialize,
        if_version: Option<u64>,
    ) -> Result<Record, Error> {
        let body = serde_json::to_vec(patch)
            .map_err(|e| Error::Protocol(format!("the patch is not JSON: {e}")))?;
        let request = self
            .client
            .request(Method::PATCH, &self.path(Some(id)), Auth::KeyOrToken)?
            .body(body, "application/merge-patch+json");
        self.client.send_json(if_match(request, if_version)).await
    }

    /// Deletes a record; with `if_version`, only if it is still at that version.
    pub async fn delete(&self, id: &str, if_version: Option<u64>) -> Result<(), Error> {
        let request =
            self.client
                .request(Method::DELETE, &self.path(Some(id)), Auth::KeyOrToken)?;
        self.client.send(if_match(request, if_version)).await?;
        Ok(())
    }

    /// One page of the collection.
    pub async fn list(&self, options: &ListOptions) -> Result<Page, Error> {
        let mut query: Vec<(String, String)> = Vec::new();
        if let Some(limit) = options.limit {
            query.push(("limit".into(), limit.to_string()));
        }
        if let Some(sort) = &options.sort {
            query.push(("sort".into(), sort.clone()));
        }
        if let Some(cursor) = &options.cursor {
            query.push(("cursor".into(), cursor.clone()));
        }
        for (field, value) in &options.filters {
            query.push((format!("filter.{field}"), value.clone()));
        }
        let request = self
            .client
            .request(Method::GET, &self.path(None), Auth::KeyOrToken)?
            .query(&query);
        self.client.send_json(request).await
    }

    /// Every record of the collection, page after page, as a stream.
    pub fn stream(&self, options: ListOptions) -> BoxStream<'_, Result<Record, Error>> {
        struct State {
            options: ListOptions,
            page: std::vec::IntoIter<Record>,
            done: bool,
        }
        let state = State {
            options,
            page: Vec::new().into_iter(),
            done: false,
        };
        futures_util::stream::unfold(state, move |mut state| async move {
            loop {
                if let Some(record) = state.page.next() {
                    return Some((Ok(record), state));
                }
                if state.done {
                    return None;
                }
                match self.list(&state.options).await {
                    Ok(page) => {
                        state.done = page.next.is_none();
                        state.options.cursor = page.next;
                        state.page = page.items.into_iter();
                    }
                    Err(error) => {
                        state.done = true;
                        return Some((Err(error), state));
                    }
                }
            }
        })
        .boxed()
    }
}
