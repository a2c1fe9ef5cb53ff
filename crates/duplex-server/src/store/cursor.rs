//! List cursors that clients cannot read, forge or carry to another listing.
//!
//! A cursor is the position after the last record of a page: its sort key and insertion
//! sequence. Handed out as plain text it would show row ids and let a client make up positions,
//! or reuse a cursor of one collection in another. So it is sealed with a key the server keeps
//! in the store (shared by every node): a deterministic authenticated encryption in the SIV
//! style, built from HMAC-SHA-256 alone. The tag is an HMAC over the listing it belongs to
//! (collection, sort, filters) and the position; the position is encrypted with a keystream
//! derived from the tag. Opening recomputes the tag and compares it in constant time, so a
//! cursor that was altered, forged, or issued for another listing is refused.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use super::{Cursor, FieldFilter, SortOrder};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of the tag kept in a cursor.
const TAG: usize = 16;
/// Bytes of a position: order (1), sort key (8), sequence (8).
const POSITION: usize = 17;

/// The key cursors are sealed with.
#[derive(Clone)]
pub struct CursorKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey(..)")
    }
}

impl CursorKey {
    /// A key from a secret (at least 16 bytes).
    pub fn new(secret: &[u8]) -> Self {
        CursorKey {
            key: secret.to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }

    /// The tag of `position` in the listing of `collection` with `filters`.
    fn tag(&self, collection: &str, filters: &[FieldFilter], position: &[u8]) -> [u8; TAG] {
        let mut mac = self.mac();
        mac.update(b"duplex cursor v2\0");
        // Every part length-prefixed, so no two listings write the same bytes.
        let mut part = |bytes: &[u8]| {
            mac.update(&(bytes.len() as u64).to_be_bytes());
            mac.update(bytes);
        };
        part(collection.as_bytes());
        let mut sorted: Vec<(&str, &str)> = filters
            .iter()
            .map(|f| (f.field.as_str(), f.value.as_str()))
            .collect();
        sorted.sort_unstable();
        part(&(sorted.len() as u64).to_be_bytes());
        for (field, value) in sorted {
            part(field.as_bytes());
            part(value.as_bytes());
        }
        part(position);
        let digest = mac.finalize().into_bytes();
        let mut tag = [0; TAG];
        tag.copy_from_slice(&digest[..TAG]);
        tag
    }

    /// XORs `position` with the keystream of `tag`.
    fn crypt(&self, tag: &[u8; TAG], position: &mut [u8; POSITION]) {
        let mut mac = self.mac();
        mac.update(b"duplex cursor stream\0");
        mac.update(tag);
        let stream = mac.finalize().into_bytes();
        for (byte, key) in position.iter_mut().zip(stream.iter()) {
            *byte ^= key;
        }
    }

    /// The opaque text of `cursor` for the listing of `collection` with `filters`.
    pub fn seal(&self, cursor: &Cursor, collection: &str, filters: &[FieldFilter]) -> String {
        let mut position = [0; POSITION];
        position[0] = order_byte(cursor.order);
        position[1..9].copy_from_slice(&cursor.key.to_be_bytes());
        position[9..].copy_from_slice(&cursor.seq.to_be_bytes());
        let tag = self.tag(collection, filters, &position);
        self.crypt(&tag, &mut position);
        let mut sealed = Vec::with_capacity(TAG + POSITION);
        sealed.extend_from_slice(&tag);
        sealed.extend_from_slice(&position);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed)
    }

    /// The cursor in `text`, if this server sealed it for this very listing.
    pub fn open(&self, text: &str, collection: &str, filters: &[FieldFilter]) -> Option<Cursor> {
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .ok()?;
        if sealed.len() != TAG + POSITION {
            return None;
        }
        let mut tag = [0; TAG];
        tag.copy_from_slice(&sealed[..TAG]);
        let mut position = [0; POSITION];
        position.copy_from_slice(&sealed[TAG..]);
        self.crypt(&tag, &mut position);
        let expected = self.tag(collection, filters, &position);
        if !bool::from(expected.ct_eq(&tag)) {
            return None;
        }
        let mut key = [0; 8];
        key.copy_from_slice(&position[1..9]);
        let mut seq = [0; 8];
        seq.copy_from_slice(&position[9..]);
        Some(Cursor {
            order: order_of(position[0])?,
            key: i64::from_be_bytes(key),
            seq: i64::from_be_bytes(seq),
        })
    }
}

fn order_byte(order: SortOrder) -> u8 {
    match order {
        SortOrder::CreatedAscending => 1,
        SortOrder::CreatedDescending => 2,
        SortOrder::UpdatedAscending => 3,
        SortOrder::UpdatedDescending => 4,
    }
}

fn order_of(byte: u8) -> Option<SortOrder> {
    Some(match byte {
        1 => SortOrder::CreatedAscending,
        2 => SortOrder::CreatedDescending,
        3 => SortOrder::UpdatedAscending,
        4 => SortOrder::UpdatedDescending,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(field: &str, value: &str) -> FieldFilter {
        FieldFilter {
            field: field.into(),
            value: value.into(),
        }
    }

    #[test]
    fn a_sealed_cursor_opens_only_for_its_own_listing() {
        let key = CursorKey::new(&[7; 32]);
        let cursor = Cursor {
            order: SortOrder::UpdatedDescending,
            key: 1_700_000_000_123_456,
            seq: 42,
        };
        let filters = [filter("author", "ana"), filter("stars", "5")];
        let text = key.seal(&cursor, "posts", &filters);
        assert_eq!(key.open(&text, "posts", &filters), Some(cursor));
        // The same filters in another order are the same listing.
        let reordered = [filter("stars", "5"), filter("author", "ana")];
        assert_eq!(key.open(&text, "posts", &reordered), Some(cursor));
        assert_eq!(key.open(&text, "comments", &filters), None);
        assert_eq!(key.open(&text, "posts", &filters[..1]), None);
        assert_eq!(key.open(&text, "posts", &[]), None);
        assert_eq!(
            CursorKey::new(&[8; 32]).open(&text, "posts", &filters),
            None
        );
        assert!(!text.contains("42"), "the position is not readable");
    }

    #[test]
    fn altered_and_foreign_text_is_refused() {
        let key = CursorKey::new(&[7; 32]);
        let cursor = Cursor {
            order: SortOrder::CreatedAscending,
            key: 5,
            seq: 9,
        };
        let text = key.seal(&cursor, "posts", &[]);
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&text)
            .expect("base64");
        for index in [0, TAG, TAG + 8, bytes.len() - 1] {
            bytes[index] ^= 1;
            let altered = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
            assert_eq!(key.open(&altered, "posts", &[]), None);
            bytes[index] ^= 1;
        }
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("1:created:5:9");
        assert_eq!(key.open(&plain, "posts", &[]), None);
        assert_eq!(key.open("not a cursor", "posts", &[]), None);
        assert_eq!(key.open("", "posts", &[]), None);
    }
}
