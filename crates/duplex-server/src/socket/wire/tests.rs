use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::*;

/// A masked client frame.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn pair(max_message: usize) -> (Wire<DuplexStream>, DuplexStream) {
    let (server, client) = tokio::io::duplex(1 << 20);
    (Wire::new(server, Vec::new(), max_message), client)
}

async fn next(wire: &mut Wire<DuplexStream>) -> Option<Result<Incoming, WireError>> {
    std::future::poll_fn(|cx| wire.poll_next(cx)).await
}

/// Everything the server wrote so far (after a flush).
async fn written(wire: &mut Wire<DuplexStream>, client: &mut DuplexStream) -> Vec<u8> {
    wire.flush().await.expect("flush");
    let mut out = vec![0; 1 << 16];
    let n = client.read(&mut out).await.expect("read");
    out.truncate(n);
    out
}

#[tokio::test]
async fn a_frame_split_across_reads_is_read_whole_and_nothing_is_kept_after() {
    let (mut wire, mut client) = pair(1 << 20);
    let frame = client_frame(0x81, br#"{"type":"ping","id":1}"#);
    let reader = tokio::spawn(async move {
        let message = next(&mut wire).await;
        (message, wire)
    });
    for byte in &frame {
        client.write_all(&[*byte]).await.expect("write");
        tokio::task::yield_now().await;
    }
    let (message, wire) = reader.await.expect("join");
    assert_eq!(
        message.expect("a message").expect("valid"),
        Incoming::Text(r#"{"type":"ping","id":1}"#.to_owned())
    );
    assert_eq!(
        wire.unread.capacity(),
        0,
        "an idle connection holds no buffer"
    );
    assert!(wire.fragments.is_none());
}

#[tokio::test]
async fn two_frames_in_one_read_are_taken_one_by_one() {
    let (mut wire, mut client) = pair(1 << 20);
    let mut bytes = client_frame(0x81, b"one");
    bytes.extend(client_frame(0x82, &[1, 2, 3]));
    bytes.extend(client_frame(0x81, &vec![b'x'; 70_000]));
    client.write_all(&bytes).await.expect("write");
    assert_eq!(
        next(&mut wire).await.expect("one").expect("valid"),
        Incoming::Text("one".to_owned())
    );
    assert_eq!(
        next(&mut wire).await.expect("two").expect("valid"),
        Incoming::Binary(Bytes::from_static(&[1, 2, 3]))
    );
    match next(&mut wire).await.expect("three").expect("valid") {
        Incoming::Text(text) => assert_eq!(text.len(), 70_000),
        other => panic!("{other:?}"),
    }
    assert_eq!(wire.unread.capacity(), 0);
}

#[tokio::test]
async fn fragments_make_one_message_and_a_ping_between_them_is_answered() {
    let (mut wire, mut client) = pair(1 << 20);
    let mut bytes = client_frame(0x01, b"hel");
    bytes.extend(client_frame(0x89, b"p"));
    bytes.extend(client_frame(0x00, b"lo "));
    bytes.extend(client_frame(0x80, "wörld".as_bytes()));
    client.write_all(&bytes).await.expect("write");
    assert_eq!(
        next(&mut wire).await.expect("ping").expect("valid"),
        Incoming::Control
    );
    assert_eq!(
        next(&mut wire).await.expect("message").expect("valid"),
        Incoming::Text("hello wörld".to_owned())
    );
    // The pong carries the ping's payload, unmasked.
    assert_eq!(written(&mut wire, &mut client).await, [0x8A, 1, b'p']);
}

#[tokio::test]
async fn written_room_is_kept_when_small_and_freed_when_large_or_released() {
    let (mut wire, mut client) = pair(1 << 20);
    wire.queue_text(b"a small batch");
    written(&mut wire, &mut client).await;
    assert!(!wire.has_unwritten());
    assert!(wire.out.capacity() > 0, "a busy connection keeps its room");
    wire.release();
    assert_eq!(wire.out.capacity(), 0, "an idle one gives it back");
    wire.queue_binary(&[1; 10_000]);
    wire.flush().await.expect("flush");
    let mut sink = vec![0; 1 << 16];
    let mut read = 0;
    while read < 10_004 {
        read += client.read(&mut sink).await.expect("read");
    }
    assert_eq!(wire.out.capacity(), 0, "more than 4 KiB is not kept");
}

#[tokio::test]
async fn a_close_is_echoed_and_ends_the_reading() {
    let (mut wire, mut client) = pair(1 << 20);
    let mut bytes = client_frame(0x88, &[0x03, 0xE8, b'b', b'y', b'e']);
    bytes.extend(client_frame(0x81, b"after the close"));
    client.write_all(&bytes).await.expect("write");
    assert_eq!(
        next(&mut wire).await.expect("close").expect("valid"),
        Incoming::Close
    );
    assert!(next(&mut wire).await.is_none());
    assert_eq!(written(&mut wire, &mut client).await, [0x88, 2, 0x03, 0xE8]);
}

#[tokio::test]
async fn broken_framing_is_refused_with_what_broke() {
    let cases: [(Vec<u8>, &str); 7] = [
        (
            {
                let mut frame = client_frame(0x81, b"x");
                frame[1] &= 0x7F;
                frame
            },
            "unmasked",
        ),
        (client_frame(0xC1, b"x"), "reserved bits"),
        (client_frame(0x83, b"x"), "unknown opcode"),
        (client_frame(0x09, b"x"), "control frame"),
        (client_frame(0x89, &[0; 126]), "control frame"),
        (client_frame(0x80, b"x"), "continuation"),
        (client_frame(0x81, &[b'{', 0xFF, b'}']), "UTF-8"),
    ];
    for (bytes, expected) in cases {
        let (mut wire, mut client) = pair(1 << 20);
        client.write_all(&bytes).await.expect("write");
        match next(&mut wire).await {
            Some(Err(WireError::Protocol(what))) => {
                assert!(what.contains(expected), "{what:?} for {expected:?}");
            }
            other => panic!("{expected}: {other:?}"),
        }
    }
    // A new message inside a fragmented one.
    let (mut wire, mut client) = pair(1 << 20);
    let mut bytes = client_frame(0x01, b"a");
    bytes.extend(client_frame(0x81, b"b"));
    client.write_all(&bytes).await.expect("write");
    assert!(matches!(
        next(&mut wire).await,
        Some(Err(WireError::Protocol(_)))
    ));
}

#[tokio::test]
async fn a_large_frame_announced_holds_only_what_arrived() {
    let (mut wire, mut client) = pair(1 << 20);
    let frame = client_frame(0x82, &[7; 60_000]);
    // The header and a few bytes: the buffer holds those, not the 60,000 announced.
    client.write_all(&frame[..20]).await.expect("write");
    let poll = std::future::poll_fn(|cx| Poll::Ready(wire.poll_next(cx))).await;
    assert!(poll.is_pending());
    assert!(wire.unread.capacity() < 4096, "{}", wire.unread.capacity());
    client.write_all(&frame[20..]).await.expect("write");
    match next(&mut wire).await.expect("the frame").expect("valid") {
        Incoming::Binary(data) => assert_eq!(data.len(), 60_000),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_oversized_message_is_refused_before_its_payload_arrives() {
    let (mut wire, mut client) = pair(1024);
    // The header alone announces 2,048 bytes.
    let frame = client_frame(0x81, &[b'x'; 2048]);
    client.write_all(&frame[..8]).await.expect("write");
    assert!(matches!(
        next(&mut wire).await,
        Some(Err(WireError::TooLarge))
    ));
    // Fragments that add up to more than the limit.
    let (mut wire, mut client) = pair(1024);
    let mut bytes = client_frame(0x01, &[b'x'; 600]);
    bytes.extend(client_frame(0x80, &[b'x'; 600]));
    client.write_all(&bytes).await.expect("write");
    assert!(matches!(
        next(&mut wire).await,
        Some(Err(WireError::TooLarge))
    ));
}

#[tokio::test]
async fn frames_are_written_unmasked_with_the_shortest_length() {
    let (mut wire, mut client) = pair(1 << 20);
    wire.queue_text(b"hi");
    wire.queue_ping();
    wire.queue_binary(&[7; 126]);
    wire.queue_close(1000, "done");
    let out = written(&mut wire, &mut client).await;
    assert_eq!(&out[..4], &[0x81, 2, b'h', b'i']);
    assert_eq!(&out[4..6], &[0x89, 0]);
    assert_eq!(&out[6..10], &[0x82, 126, 0, 126]);
    assert_eq!(&out[136..], &[0x88, 6, 0x03, 0xE8, b'd', b'o', b'n', b'e']);
    assert_eq!(Wire::<DuplexStream>::frame_len(2), 4);
    assert_eq!(Wire::<DuplexStream>::frame_len(126), 130);
    assert_eq!(Wire::<DuplexStream>::frame_len(70_000), 70_010);
}

#[test]
fn unmasking_covers_every_byte() {
    let mask = [1, 2, 3, 4];
    let original: Vec<u8> = (0..11).collect();
    let mut payload = original.clone();
    unmask(&mut payload, mask);
    let expected: Vec<u8> = original
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ mask[i % 4])
        .collect();
    assert_eq!(payload, expected);
    unmask(&mut payload, mask);
    assert_eq!(payload, original);
}
