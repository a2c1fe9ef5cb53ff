//! The records API over real HTTP against a real server on an ephemeral port.

use std::collections::HashSet;
use std::time::Duration;

use duplex_testkit::TestServer;
use reqwest::{Client, Response, StatusCode, header};
use serde_json::{Value, json};

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn create(server: &TestServer, collection: &str, body: Value) -> Value {
    let response = client()
        .post(server.url(&format!("/api/collections/{collection}/records")))
        .json(&body)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.expect("json")
}

/// GETs `url` and reads the JSON answer.
async fn get_json(url: impl reqwest::IntoUrl) -> Value {
    client()
        .get(url)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json")
}

/// Asserts a problem+json response and returns its code.
async fn problem_code(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("problem json");
    assert_eq!(body["status"], status.as_u16());
    let code = body["code"].as_str().expect("code").to_owned();
    assert_eq!(body["type"], format!("urn:duplex:problem:{code}"));
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    code
}

async fn create_returns_201_with_location_etag_and_server_fields(store: Store) {
    let server = start(store, |_| {}).await;
    let response = client()
        .post(server.url("/api/collections/posts/records"))
        .json(&json!({"title": "hello", "author": "ana"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()[header::ETAG], "\"1\"");
    let location = response.headers()[header::LOCATION]
        .to_str()
        .expect("ascii")
        .to_owned();
    let record: Value = response.json().await.expect("json");
    let id = record["id"].as_str().expect("id");
    assert_eq!(location, format!("/api/collections/posts/records/{id}"));
    assert_eq!(record["version"], 1);
    assert_eq!(record["title"], "hello");
    assert_eq!(record["created"], record["updated"]);
    let created = record["created"].as_str().expect("created");
    time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
        .expect("created is RFC 3339");

    let fetched: Value = get_json(server.url(&location)).await;
    assert_eq!(fetched, record);
}

async fn server_fields_in_a_body_are_ignored(store: Store) {
    let server = start(store, |_| {}).await;
    let record = create(
        &server,
        "posts",
        json!({"id": "mine", "version": 99, "created": "x", "updated": "y", "title": "t"}),
    )
    .await;
    assert_ne!(record["id"], "mine");
    assert_eq!(record["version"], 1);
    assert_ne!(record["created"], "x");
    let id = record["id"].as_str().expect("id");
    let replaced: Value = client()
        .put(server.url(&format!("/api/collections/posts/records/{id}")))
        .json(&json!({"id": "other", "version": 1000, "title": "u"}))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(replaced["id"], id);
    assert_eq!(replaced["version"], 2);
    assert_eq!(replaced["created"], record["created"]);
}

async fn if_none_match_answers_304_for_the_current_version_only(store: Store) {
    let server = start(store, |_| {}).await;
    let record = create(&server, "posts", json!({"title": "a"})).await;
    let url = server.url(&format!(
        "/api/collections/posts/records/{}",
        record["id"].as_str().expect("id")
    ));
    let response = client().get(&url).send().await.expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let etag = response.headers()[header::ETAG].clone();

    for tag in [
        etag.to_str().expect("ascii"),
        "W/\"1\"",
        "\"7\", \"1\"",
        "*",
    ] {
        let response = client()
            .get(&url)
            .header(header::IF_NONE_MATCH, tag)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED, "{tag}");
        assert_eq!(response.headers()[header::ETAG], etag);
        assert!(response.bytes().await.expect("body").is_empty());
    }
    let response = client()
        .get(&url)
        .header(header::IF_NONE_MATCH, "\"2\"")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
}

async fn put_with_a_stale_if_match_is_412_and_nothing_is_lost(store: Store) {
    let server = start(store, |_| {}).await;
    let record = create(&server, "docs", json!({"text": "v1"})).await;
    let url = server.url(&format!(
        "/api/collections/docs/records/{}",
        record["id"].as_str().expect("id")
    ));

    // Two writers both read version 1; the first wins, the second is told it lost.
    let first = client()
        .put(&url)
        .header(header::IF_MATCH, "\"1\"")
        .json(&json!({"text": "from first"}))
        .send()
        .await
        .expect("request");
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(first.headers()[header::ETAG], "\"2\"");
    let second = client()
        .put(&url)
        .header(header::IF_MATCH, "\"1\"")
        .json(&json!({"text": "from second"}))
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem_code(second, StatusCode::PRECONDITION_FAILED).await,
        "precondition_failed"
    );
    let now: Value = get_json(&url).await;
    assert_eq!(now["text"], "from first");
    assert_eq!(now["version"], 2);

    // A weak tag never matches If-Match (strong comparison); * matches any existing record.
    let weak = client()
        .put(&url)
        .header(header::IF_MATCH, "W/\"2\"")
        .json(&json!({"text": "weak"}))
        .send()
        .await
        .expect("request");
    assert_eq!(weak.status(), StatusCode::PRECONDITION_FAILED);
    let any = client()
        .put(&url)
        .header(header::IF_MATCH, "*")
        .json(&json!({"text": "any"}))
        .send()
        .await
        .expect("request");
    assert_eq!(any.status(), StatusCode::OK);
}

async fn patch_applies_a_json_merge_patch_under_both_media_types(store: Store) {
    let server = start(store, |_| {}).await;
    let record = create(
        &server,
        "profiles",
        json!({"name": "ana", "links": {"web": "a.example", "git": "g"}, "tags": ["x"]}),
    )
    .await;
    let url = server.url(&format!(
        "/api/collections/profiles/records/{}",
        record["id"].as_str().expect("id")
    ));
    let patched: Value = client()
        .patch(&url)
        .header(header::CONTENT_TYPE, "application/merge-patch+json")
        .body(r#"{"links": {"git": null, "mail": "m"}, "tags": null}"#)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(patched["links"], json!({"web": "a.example", "mail": "m"}));
    assert!(patched.get("tags").is_none());
    assert_eq!(patched["name"], "ana");
    assert_eq!(patched["version"], 2);

    let response = client()
        .patch(&url)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::IF_MATCH, "\"2\"")
        .body(r#"{"name": "bo"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let patched: Value = response.json().await.expect("json");
    assert_eq!(patched["name"], "bo");
    assert_eq!(patched["version"], 3);

    let stale = client()
        .patch(&url)
        .header(header::CONTENT_TYPE, "application/merge-patch+json")
        .header(header::IF_MATCH, "\"2\"")
        .body(r#"{"name": "cy"}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);

    let not_object = client()
        .patch(&url)
        .header(header::CONTENT_TYPE, "application/merge-patch+json")
        .body("[1, 2]")
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem_code(not_object, StatusCode::UNPROCESSABLE_ENTITY).await,
        "validation_failed"
    );
}

async fn delete_answers_204_then_404_and_honours_if_match(store: Store) {
    let server = start(store, |_| {}).await;
    let record = create(&server, "posts", json!({"t": 1})).await;
    let url = server.url(&format!(
        "/api/collections/posts/records/{}",
        record["id"].as_str().expect("id")
    ));
    let stale = client()
        .delete(&url)
        .header(header::IF_MATCH, "\"5\"")
        .send()
        .await
        .expect("request");
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    let deleted = client()
        .delete(&url)
        .header(header::IF_MATCH, "\"1\"")
        .send()
        .await
        .expect("request");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    for response in [
        client().get(&url).send().await.expect("request"),
        client().delete(&url).send().await.expect("request"),
        client()
            .put(&url)
            .json(&json!({"t": 2}))
            .send()
            .await
            .expect("request"),
    ] {
        assert_eq!(
            problem_code(response, StatusCode::NOT_FOUND).await,
            "not_found"
        );
    }
}

async fn put_with_if_none_match_star_creates_with_a_chosen_id_once(store: Store) {
    let server = start(store, |_| {}).await;
    let url = server.url("/api/collections/settings/records/site-main");
    let response = client()
        .put(&url)
        .header(header::IF_NONE_MATCH, "*")
        .json(&json!({"theme": "dark"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()[header::LOCATION],
        "/api/collections/settings/records/site-main"
    );
    let record: Value = response.json().await.expect("json");
    assert_eq!(record["id"], "site-main");
    let again = client()
        .put(&url)
        .header(header::IF_NONE_MATCH, "*")
        .json(&json!({"theme": "light"}))
        .send()
        .await
        .expect("request");
    assert_eq!(again.status(), StatusCode::PRECONDITION_FAILED);
}

async fn list_page(server: &TestServer, collection: &str, query: &str) -> (Vec<Value>, Value) {
    let response = client()
        .get(server.url(&format!("/api/collections/{collection}/records?{query}")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK, "{query}");
    let mut page: Value = response.json().await.expect("json");
    let items = page["items"].as_array().expect("items").clone();
    (items, page["next"].take())
}

async fn listing_pages_sorts_and_filters(store: Store) {
    let server = start(store, |_| {}).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let record = create(
            &server,
            "posts",
            json!({"n": i, "author": if i % 2 == 0 { "ana" } else { "bo" }, "pinned": i == 3}),
        )
        .await;
        ids.push(record["id"].as_str().expect("id").to_owned());
    }

    let (items, next) = list_page(&server, "posts", "").await;
    assert_eq!(items.len(), 7);
    assert!(next.is_null());

    // Oldest first by default, in pages of 3.
    let mut seen = Vec::new();
    let mut query = "limit=3".to_owned();
    loop {
        let (items, next) = list_page(&server, "posts", &query).await;
        assert!(items.len() <= 3);
        seen.extend(
            items
                .iter()
                .map(|r| r["id"].as_str().expect("id").to_owned()),
        );
        match next.as_str() {
            Some(cursor) => query = format!("limit=3&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ids);

    let (items, _) = list_page(&server, "posts", "sort=-created&limit=2").await;
    assert_eq!(items[0]["id"], ids[6]);
    assert_eq!(items[1]["id"], ids[5]);

    // Touch the first record: it becomes the most recently updated.
    let touched = client()
        .patch(server.url(&format!("/api/collections/posts/records/{}", ids[0])))
        .header(header::CONTENT_TYPE, "application/merge-patch+json")
        .body(r#"{"touched": true}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(touched.status(), StatusCode::OK);
    let (items, _) = list_page(&server, "posts", "sort=-updated&limit=1").await;
    assert_eq!(items[0]["id"], ids[0]);
    let (items, _) = list_page(&server, "posts", "sort=updated").await;
    assert_eq!(items.last().expect("items")["id"], ids[0]);

    let (items, _) = list_page(&server, "posts", "filter.author=ana").await;
    assert_eq!(items.len(), 4);
    assert!(items.iter().all(|r| r["author"] == "ana"));
    let (items, _) = list_page(&server, "posts", "filter.author=bo&filter.n=3").await;
    assert_eq!(items.len(), 1);
    assert_eq!(items[0]["n"], 3);
    let (items, _) = list_page(&server, "posts", "filter.pinned=true").await;
    assert_eq!(items.len(), 1);
    let (items, _) = list_page(&server, "posts", "filter.missing=1").await;
    assert!(items.is_empty());
    let (items, _) = list_page(&server, "posts", &format!("filter.id={}", ids[2])).await;
    assert_eq!(items.len(), 1);

    let (items, next) = list_page(&server, "empty", "").await;
    assert!(items.is_empty());
    assert!(next.is_null());
}

async fn pagination_neither_skips_nor_repeats_under_concurrent_inserts(store: Store) {
    let server = start(store, |_| {}).await;
    let mut before = HashSet::new();
    for i in 0..120 {
        let record = create(&server, "feed", json!({"i": i})).await;
        before.insert(record["id"].as_str().expect("id").to_owned());
    }

    for sort in ["created", "-created", "updated", "-updated"] {
        let writer = {
            let url = server.url("/api/collections/feed/records");
            tokio::spawn(async move {
                let client = client();
                for i in 0..60 {
                    let response = client
                        .post(&url)
                        .json(&json!({"during": i}))
                        .send()
                        .await
                        .expect("request");
                    assert_eq!(response.status(), StatusCode::CREATED);
                }
            })
        };
        let mut seen = Vec::new();
        let mut query = format!("limit=7&sort={sort}");
        loop {
            let (items, next) = list_page(&server, "feed", &query).await;
            seen.extend(
                items
                    .iter()
                    .map(|r| r["id"].as_str().expect("id").to_owned()),
            );
            match next.as_str() {
                Some(cursor) => query = format!("limit=7&sort={sort}&cursor={cursor}"),
                None => break,
            }
        }
        writer.await.expect("writer");
        let unique: HashSet<_> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "{sort}: a record was repeated");
        assert!(
            before.is_subset(&unique),
            "{sort}: a record that existed before paging was skipped"
        );
        before = unique.union(&before).cloned().collect();
    }
}

/// The first page of a listing (which a SQLite server keeps in memory until the collection is
/// written) shows every acknowledged create, replace, patch and delete at once, including
/// while other clients read the same page at full speed.
async fn the_first_page_shows_every_acknowledged_write(store: Store) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let server = start(store, |_| {}).await;
    let records = server.url("/api/collections/feed/records");
    let mut ids = Vec::new();
    for i in 0..3 {
        let record = create(&server, "feed", json!({"i": i})).await;
        ids.push(record["id"].as_str().expect("id").to_owned());
    }
    // Read twice: the second read may be the kept page.
    for _ in 0..2 {
        let (items, _) = list_page(&server, "feed", "limit=20").await;
        assert_eq!(items.len(), 3);
    }
    // Another collection's writes and pages are apart.
    create(&server, "other", json!({})).await;
    let (items, _) = list_page(&server, "other", "limit=20").await;
    assert_eq!(items.len(), 1);

    let added = create(&server, "feed", json!({"i": 3})).await;
    let (items, _) = list_page(&server, "feed", "limit=20").await;
    assert_eq!(items.len(), 4, "a create shows");
    assert_eq!(items[3]["id"], added["id"]);

    let patched = client()
        .patch(format!("{records}/{}", ids[1]))
        .header(header::CONTENT_TYPE, "application/merge-patch+json")
        .body(r#"{"i": 10}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(patched.status(), StatusCode::OK);
    let (items, _) = list_page(&server, "feed", "limit=20").await;
    assert_eq!(items[1]["i"], 10, "a patch shows");
    assert_eq!(items[1]["version"], 2);
    let (items, _) = list_page(&server, "feed", "limit=20&sort=-updated").await;
    assert_eq!(
        items[0]["id"],
        ids[1].as_str(),
        "and moves it in the updated order"
    );

    let replaced = client()
        .put(format!("{records}/{}", ids[2]))
        .json(&json!({"replaced": true}))
        .send()
        .await
        .expect("request");
    assert_eq!(replaced.status(), StatusCode::OK);
    let (items, _) = list_page(&server, "feed", "limit=20").await;
    assert_eq!(items[2]["replaced"], true, "a replace shows");
    assert!(items[2].get("i").is_none());

    let deleted = client()
        .delete(format!("{records}/{}", ids[0]))
        .send()
        .await
        .expect("request");
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let (items, _) = list_page(&server, "feed", "limit=20").await;
    assert_eq!(items.len(), 3, "a delete shows");
    assert!(items.iter().all(|r| r["id"] != ids[0].as_str()));

    // Readers at full speed while creates are acknowledged one by one: every page read after
    // an acknowledgement holds at least the records acknowledged before the read began.
    let acknowledged = Arc::new(AtomicUsize::new(items.len()));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (acknowledged, done, url) = (
            acknowledged.clone(),
            done.clone(),
            format!("{records}?limit=100"),
        );
        readers.push(tokio::spawn(async move {
            let mut reads = 0;
            while !done.load(Ordering::Acquire) {
                let at_least = acknowledged.load(Ordering::Acquire);
                let page = get_json(&url).await;
                let seen = page["items"].as_array().expect("items").len();
                assert!(
                    seen >= at_least,
                    "a page had {seen} of {at_least} acknowledged"
                );
                reads += 1;
            }
            reads
        }));
    }
    for i in 0..40 {
        create(&server, "feed", json!({"during": i})).await;
        acknowledged.fetch_add(1, Ordering::AcqRel);
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        let reads = reader.await.expect("reader");
        assert!(reads > 0);
    }
    let (items, _) = list_page(&server, "feed", "limit=100").await;
    assert_eq!(items.len(), acknowledged.load(Ordering::Acquire));
}

async fn collections_are_listed_with_record_counts(store: Store) {
    let server = start(store, |_| {}).await;
    for _ in 0..3 {
        create(&server, "posts", json!({})).await;
    }
    create(&server, "comments", json!({})).await;
    let body: Value = get_json(server.url("/api/collections")).await;
    assert_eq!(
        body,
        json!({"items": [{"name": "comments", "records": 1}, {"name": "posts", "records": 3}]})
    );
}

async fn bad_input_gets_problem_json_with_a_stable_code(store: Store) {
    let server = start(store, |config| config.max_body = 1024).await;
    let records = server.url("/api/collections/posts/records");
    let existing = create(&server, "posts", json!({"a": 1})).await;
    let record = server.url(&format!(
        "/api/collections/posts/records/{}",
        existing["id"].as_str().expect("id")
    ));
    let c = client();
    let json_post = |url: &str, body: &'static str| {
        c.post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
    };

    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            json_post(&records, "{\"a\": "),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (json_post(&records, ""), StatusCode::BAD_REQUEST, "bad_json"),
        (
            json_post(&records, "[1,2]"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            json_post(&records, "\"text\""),
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        ),
        (
            c.post(&records).body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            c.post(&records)
                .header(header::CONTENT_TYPE, "text/plain")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            c.post(&records)
                .header(header::CONTENT_TYPE, "application/json")
                .body(format!("{{\"big\": \"{}\"}}", "x".repeat(2048))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            json_post(&server.url("/api/collections/Posts/records"), "{}"),
            StatusCode::BAD_REQUEST,
            "invalid_collection",
        ),
        (
            c.get(server.url(&format!("/api/collections/{}/records", "x".repeat(65)))),
            StatusCode::BAD_REQUEST,
            "invalid_collection",
        ),
        (
            c.get(server.url("/api/collections/posts/records/bad.id")),
            StatusCode::BAD_REQUEST,
            "invalid_id",
        ),
        (
            c.get(server.url("/api/collections/posts/records/%FF")),
            StatusCode::BAD_REQUEST,
            "invalid_path",
        ),
        (
            c.get(server.url("/api/collections/posts/records/nosuchid")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            c.get(server.url("/api/nothing-here")),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            c.delete(server.url("/api/collections")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            c.post(&record)
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}"),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            c.get(format!("{records}?limit=0")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.get(format!("{records}?limit=501")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.get(format!("{records}?limit=ten")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.get(format!("{records}?sort=title")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.get(format!("{records}?cursor=garbage")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.get(format!("{records}?filter.a%20b=1")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.get(format!("{records}?page=2")),
            StatusCode::BAD_REQUEST,
            "invalid_query",
        ),
        (
            c.put(&record)
                .header(header::IF_MATCH, "1")
                .json(&json!({})),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (
            c.get(&record).header(header::IF_NONE_MATCH, "garbage"),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (
            c.patch(&record)
                .header(header::CONTENT_TYPE, "application/merge-patch+json")
                .header(header::IF_NONE_MATCH, "*")
                .body("{}"),
            StatusCode::BAD_REQUEST,
            "invalid_header",
        ),
        (
            c.patch(&record)
                .header(header::CONTENT_TYPE, "text/plain")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
    ];
    for (request, status, code) in cases {
        let request = request.build().expect("request");
        let what = format!("{} {}", request.method(), request.url());
        let response = c.execute(request).await.expect("response");
        assert_eq!(problem_code(response, status).await, code, "{what}");
    }

    // A cursor is only valid for the sort order it was issued for.
    for _ in 0..2 {
        create(&server, "posts", json!({})).await;
    }
    let (_, next) = list_page(&server, "posts", "limit=1").await;
    let cursor = next.as_str().expect("a next cursor");
    let response = c
        .get(format!("{records}?sort=-created&cursor={cursor}"))
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem_code(response, StatusCode::BAD_REQUEST).await,
        "invalid_query"
    );

    // After all that, the server still serves and the record is intact.
    let intact: Value = c
        .get(&record)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert_eq!(intact["a"], 1);
    assert_eq!(intact["version"], 1);
}

async fn a_body_streamed_past_the_limit_without_a_length_is_413(store: Store) {
    let server = start(store, |config| config.max_body = 1024).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(b"{\"a\": \"".to_vec()),
        Ok(vec![b'x'; 4096]),
        Ok(b"\"}".to_vec()),
    ];
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let response = client()
        .post(server.url("/api/collections/posts/records"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem_code(response, StatusCode::PAYLOAD_TOO_LARGE).await,
        "payload_too_large"
    );
}

async fn operations_endpoints_answer(store: Store) {
    let server = start(store, |_| {}).await;
    let c = client();
    let health = c.get(server.url("/healthz")).send().await.expect("request");
    assert_eq!(health.status(), StatusCode::OK);
    let ready = c.get(server.url("/readyz")).send().await.expect("request");
    assert_eq!(ready.status(), StatusCode::OK);

    create(&server, "posts", json!({})).await;
    let metrics = c
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains(
            r#"duplex_http_requests_total{method="POST",route="/api/collections/{collection}/records",status="201"} 1"#
        ),
        "{metrics}"
    );
    // 1-2-5 bounds: an objective of 5 ms is a bucket's edge.
    assert!(
        metrics.contains(
            r#"duplex_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/api/collections/{collection}/records",status="201"} "#
        ),
        "{metrics}"
    );

    let openapi: Value = c
        .get(server.url("/openapi.json"))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let paths = openapi["paths"].as_object().expect("paths");
    for path in [
        "/api/collections",
        "/api/collections/{collection}/records",
        "/api/collections/{collection}/records/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(paths.contains_key(path), "{path} missing from openapi.json");
    }
    let item = &paths["/api/collections/{collection}/records/{id}"];
    for method in ["get", "put", "patch", "delete"] {
        assert!(item.get(method).is_some(), "{method} missing");
    }
}

/// Which store a test case runs on.
#[derive(Debug, Clone, Copy)]
enum Store {
    Sqlite,
    Postgres,
}

/// A server on `store`, configured by `configure`; `None` (the case says it skipped) when
/// PostgreSQL is asked for and `DUPLEX_TEST_POSTGRES` is unset.
async fn start(store: Store, configure: impl FnOnce(&mut duplex_server::Config)) -> TestServer {
    match store {
        Store::Sqlite => TestServer::start_with(configure).await,
        Store::Postgres => {
            let url = duplex_testkit::postgres_store().expect("checked by the case wrapper");
            TestServer::start_with(|config| {
                config.store = Some(url);
                configure(config);
            })
            .await
        }
    }
}

/// Every case runs on SQLite and on PostgreSQL (when `DUPLEX_TEST_POSTGRES` is set).
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(super::Store::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    if duplex_testkit::postgres_store().is_none() {
                        eprintln!("skipped: DUPLEX_TEST_POSTGRES is not set");
                        return;
                    }
                    super::$case(super::Store::Postgres).await;
                }
            )*
        }
    };
}

/// A number the store would keep as another value is refused, never silently changed; the
/// numbers it keeps come back exactly.
async fn numbers_come_back_exactly_or_are_refused(store: Store) {
    let server = start(store, |_| {}).await;
    let records = server.url("/api/collections/numbers/records");
    for body in [
        r#"{"n": 12345678901234567890123}"#,
        r#"{"pi": 3.14159265358979323846264338}"#,
        r#"{"deep": {"list": [1, 2, 18446744073709551616]}}"#,
    ] {
        let response = client()
            .post(&records)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        assert_eq!(
            problem_code(response, StatusCode::UNPROCESSABLE_ENTITY).await,
            "validation_failed",
            "{body}"
        );
    }
    let kept = create(
        &server,
        "numbers",
        json!({"max": u64::MAX, "min": i64::MIN, "tenth": 0.1, "big": 1.5e300, "text": "12345678901234567890123"}),
    )
    .await;
    let id = kept["id"].as_str().expect("id");
    let text = client()
        .get(server.url(&format!("/api/collections/numbers/records/{id}")))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    assert!(text.contains(r#""max":18446744073709551615"#), "{text}");
    assert!(text.contains(r#""min":-9223372036854775808"#), "{text}");
    assert!(text.contains(r#""tenth":0.1"#), "{text}");
    let patched = client()
        .patch(server.url(&format!("/api/collections/numbers/records/{id}")))
        .header(header::CONTENT_TYPE, "application/merge-patch+json")
        .body(r#"{"max": 99999999999999999999999}"#)
        .send()
        .await
        .expect("request");
    assert_eq!(
        problem_code(patched, StatusCode::UNPROCESSABLE_ENTITY).await,
        "validation_failed"
    );
}

/// Cursors are sealed: they do not show row ids, and one that was altered, made up, or issued
/// for another collection, sort or filter is a 400.
async fn cursors_cannot_be_forged_or_carried_to_another_listing(store: Store) {
    use base64::Engine as _;
    let server = start(store, |_| {}).await;
    for i in 0..4 {
        create(&server, "posts", json!({"n": i, "author": "ana"})).await;
        create(&server, "comments", json!({"n": i, "author": "ana"})).await;
    }
    let (_, next) = list_page(&server, "posts", "limit=2&filter.author=ana").await;
    let cursor = next.as_str().expect("a next page").to_owned();
    let (items, _) = list_page(
        &server,
        "posts",
        &format!("limit=2&filter.author=ana&cursor={cursor}"),
    )
    .await;
    assert_eq!(items.len(), 2);
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&cursor)
        .expect("base64url");
    // Sealed: a tag and an encrypted position, not the text "1:created:KEY:ROWID".
    assert_eq!(decoded.len(), 33);
    assert!(
        std::str::from_utf8(&decoded).map_or(true, |text| !text.contains("created")),
        "no readable position"
    );
    let mut altered = decoded.clone();
    altered[20] ^= 1;
    let altered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&altered);
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1:created:0:1");
    for (collection, query) in [
        (
            "comments",
            format!("limit=2&filter.author=ana&cursor={cursor}"),
        ),
        ("posts", format!("limit=2&cursor={cursor}")),
        ("posts", format!("limit=2&filter.author=bo&cursor={cursor}")),
        (
            "posts",
            format!("limit=2&sort=-created&filter.author=ana&cursor={cursor}"),
        ),
        (
            "posts",
            format!("limit=2&filter.author=ana&cursor={altered}"),
        ),
        ("posts", format!("limit=2&cursor={forged}")),
    ] {
        let response = client()
            .get(server.url(&format!("/api/collections/{collection}/records?{query}")))
            .send()
            .await
            .expect("request");
        assert_eq!(
            problem_code(response, StatusCode::BAD_REQUEST).await,
            "invalid_query",
            "{collection}?{query}"
        );
    }
}

/// The version an `ETag` names.
fn version_of(response: &Response) -> u64 {
    response.headers()[header::ETAG]
        .to_str()
        .expect("ascii")
        .trim_matches('"')
        .parse()
        .expect("a version")
}

/// Many writers at once (which SQLite's writer gathers into shared transactions): each
/// precondition is decided against exactly what committed before it, no update is lost, and
/// `records:{collection}` carries every committed write once, in commit order.
async fn concurrent_writes_stay_exact_and_are_announced_in_commit_order(store: Store) {
    let server = start(store, |_| {}).await;
    let mut ws = server.ws().await;
    ws.subscribe("records:race", 1).await;
    let base = server.url("/api/collections/race/records");
    let record = create(&server, "race", json!({"start": true})).await;
    let url = format!("{base}/{}", record["id"].as_str().expect("id"));

    // Twenty writers all read version 1: exactly one If-Match wins. Ten choose the same new id:
    // exactly one creates it. Ten plain creates all land.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..20 {
        let url = url.clone();
        tasks.spawn(async move {
            let response = client()
                .patch(&url)
                .header(header::IF_MATCH, "\"1\"")
                .header(header::CONTENT_TYPE, "application/merge-patch+json")
                .body(json!({"first": i}).to_string())
                .send()
                .await
                .expect("request");
            ("if-match", response.status())
        });
    }
    for i in 0..10 {
        let url = format!("{base}/chosen");
        tasks.spawn(async move {
            let response = client()
                .put(&url)
                .header(header::IF_NONE_MATCH, "*")
                .json(&json!({"by": i}))
                .send()
                .await
                .expect("request");
            ("if-none-match", response.status())
        });
    }
    for i in 0..10 {
        let base = base.clone();
        tasks.spawn(async move {
            let response = client()
                .post(&base)
                .json(&json!({"plain": i}))
                .send()
                .await
                .expect("request");
            ("create", response.status())
        });
    }
    let mut outcomes = std::collections::BTreeMap::<(&str, u16), u32>::new();
    while let Some(done) = tasks.join_next().await {
        let (kind, status) = done.expect("writer");
        *outcomes.entry((kind, status.as_u16())).or_default() += 1;
    }
    let expected = std::collections::BTreeMap::from([
        (("create", 201), 10),
        (("if-match", 200), 1),
        (("if-match", 412), 19),
        (("if-none-match", 201), 1),
        (("if-none-match", 412), 9),
    ]);
    assert_eq!(outcomes, expected);

    // Twenty writers each add their own field, retrying on 412 from the version they last saw:
    // every field is kept, and the versions count every write.
    let mut writers = tokio::task::JoinSet::new();
    for i in 0..20 {
        let url = url.clone();
        writers.spawn(async move {
            let client = client();
            loop {
                let current = client.get(&url).send().await.expect("request");
                let etag = current.headers()[header::ETAG].clone();
                let response = client
                    .patch(&url)
                    .header(header::IF_MATCH, etag)
                    .header(header::CONTENT_TYPE, "application/merge-patch+json")
                    .body(json!({ format!("w{i}"): true }).to_string())
                    .send()
                    .await
                    .expect("request");
                match response.status() {
                    StatusCode::OK => {
                        // Once acknowledged, no read serves an older version.
                        let written = version_of(&response);
                        let read = client.get(&url).send().await.expect("request");
                        assert!(version_of(&read) >= written, "a stale read");
                        break;
                    }
                    StatusCode::PRECONDITION_FAILED => continue,
                    other => panic!("writer {i}: {other}"),
                }
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("writer");
    }
    let now: Value = get_json(&url).await;
    assert_eq!(
        now["version"], 22,
        "1, the If-Match winner, then twenty writers"
    );
    for i in 0..20 {
        assert_eq!(now[format!("w{i}")], true, "writer {i}'s field was lost");
    }

    // The events: 1 + 1 + 1 + 10 + 20, offsets without a gap, and the record's updates in
    // version order, each carrying exactly the fields committed by then.
    let mut updates = Vec::new();
    let mut created = 0;
    let mut last_offset = None;
    for _ in 0..33 {
        let event = tokio::time::timeout(Duration::from_secs(10), ws.next_json())
            .await
            .expect("every committed write is announced");
        assert_eq!(event["type"], "message");
        let offset = event["offset"].as_u64().expect("offset");
        if let Some(last) = last_offset {
            assert_eq!(offset, last + 1, "an offset was skipped");
        }
        last_offset = Some(offset);
        match event["data"]["op"].as_str() {
            Some("created") => created += 1,
            Some("updated") => updates.push(event["data"]["record"].clone()),
            other => panic!("unexpected op {other:?}"),
        }
    }
    assert_eq!(
        created, 12,
        "the first record, the chosen id and ten plain creates"
    );
    let versions: Vec<u64> = updates
        .iter()
        .map(|r| r["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(versions, (2..=22).collect::<Vec<u64>>());
    for record in &updates {
        let fields = record
            .as_object()
            .expect("object")
            .keys()
            .filter(|k| k.starts_with('w'))
            .count() as u64;
        assert_eq!(fields + 2, record["version"].as_u64().expect("version"));
    }
}

on_both_stores!(
    concurrent_writes_stay_exact_and_are_announced_in_commit_order,
    numbers_come_back_exactly_or_are_refused,
    cursors_cannot_be_forged_or_carried_to_another_listing,
    create_returns_201_with_location_etag_and_server_fields,
    server_fields_in_a_body_are_ignored,
    if_none_match_answers_304_for_the_current_version_only,
    put_with_a_stale_if_match_is_412_and_nothing_is_lost,
    patch_applies_a_json_merge_patch_under_both_media_types,
    delete_answers_204_then_404_and_honours_if_match,
    put_with_if_none_match_star_creates_with_a_chosen_id_once,
    listing_pages_sorts_and_filters,
    pagination_neither_skips_nor_repeats_under_concurrent_inserts,
    the_first_page_shows_every_acknowledged_write,
    collections_are_listed_with_record_counts,
    bad_input_gets_problem_json_with_a_stable_code,
    a_body_streamed_past_the_limit_without_a_length_is_413,
    operations_endpoints_answer,
);

/// Two servers on one PostgreSQL database: what one writes the other reads, and two
/// conditional writes of the same version race to exactly one winner.
#[tokio::test]
async fn two_servers_share_records_through_postgres() {
    let Some(url) = duplex_testkit::postgres_store() else {
        eprintln!("skipped: DUPLEX_TEST_POSTGRES is not set");
        return;
    };
    let a = TestServer::start_with(|c| c.store = Some(url.clone())).await;
    let b = TestServer::start_with(|c| c.store = Some(url.clone())).await;
    let created = create(&a, "shared", json!({"title": "on a"})).await;
    let id = created["id"].as_str().expect("id");
    let path = format!("/api/collections/shared/records/{id}");
    let on_b: Value = client()
        .get(b.url(&path))
        .send()
        .await
        .expect("get on b")
        .json()
        .await
        .expect("json");
    assert_eq!(on_b["title"], "on a");

    let put = |server: &TestServer, title: &str| {
        client()
            .put(server.url(&path))
            .header(header::IF_MATCH, "\"1\"")
            .json(&json!({"title": title}))
            .send()
    };
    let (from_a, from_b) = tokio::join!(put(&a, "a wins"), put(&b, "b wins"));
    let mut statuses = [
        from_a.expect("put on a").status(),
        from_b.expect("put on b").status(),
    ];
    statuses.sort();
    assert_eq!(statuses, [StatusCode::OK, StatusCode::PRECONDITION_FAILED]);
}
