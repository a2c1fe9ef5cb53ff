//! Unit tests of `records`.

use super::*;

#[test]
fn entity_tags_parse_strong_weak_and_lists() {
    assert_eq!(
        parse_entity_tags("\"1\", W/\"2\"", "If-Match").expect("valid"),
        vec![EntityTag::Strong("1"), EntityTag::Weak("2")]
    );
    assert!(parse_entity_tags("1", "If-Match").is_err());
    assert!(parse_entity_tags("\"1", "If-Match").is_err());
}

#[test]
fn list_query_defaults_and_limits() {
    let key = CursorKey::new(&[1; 32]);
    let parse = |query: &str| parse_list_query(query, &key, "posts");
    let q = parse("").expect("valid");
    assert_eq!(q.limit, DEFAULT_LIMIT);
    assert_eq!(q.order, SortOrder::CreatedAscending);
    assert!(parse("limit=0").is_err());
    assert!(parse("limit=501").is_err());
    assert!(parse("limit=-1").is_err());
    assert!(parse("sort=name").is_err());
    assert!(parse("bogus=1").is_err());
    assert!(parse("filter.a.b=1").is_err());
    let q = parse("limit=500&sort=-updated&filter.author=ana").expect("valid");
    assert_eq!(q.limit, 500);
    assert_eq!(q.order, SortOrder::UpdatedDescending);
    assert_eq!(q.filters[0].field, "author");
}

#[test]
fn a_cursor_is_read_back_only_for_the_listing_it_was_sealed_for() {
    let key = CursorKey::new(&[1; 32]);
    let filters = [FieldFilter {
        field: "author".into(),
        value: "ana".into(),
    }];
    let cursor = crate::store::Cursor {
        order: SortOrder::CreatedDescending,
        key: 10,
        seq: 3,
    };
    let sealed = key.seal(&cursor, "posts", &filters);
    // The filter may come before or after the cursor in the query.
    let query = format!("cursor={sealed}&sort=-created&filter.author=ana");
    let q = parse_list_query(&query, &key, "posts").expect("valid");
    assert_eq!(q.after, Some(cursor));
    for other in [
        format!("cursor={sealed}&sort=-created&filter.author=bo"),
        format!("cursor={sealed}&sort=-created"),
    ] {
        assert!(parse_list_query(&other, &key, "posts").is_err(), "{other}");
    }
    assert!(parse_list_query(&query, &key, "comments").is_err());
    let wrong_sort = format!("cursor={sealed}&filter.author=ana");
    assert!(parse_list_query(&wrong_sort, &key, "posts").is_err());
}
