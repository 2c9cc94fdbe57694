//! The descriptor channel over real loopback TCP and real segment files: the handshake, both
//! directions of records, and every refusal typed (never a panic).

use std::time::Duration;

use proptest::prelude::*;
use shoal_proto::descriptor::{DescriptorKind, SegmentId, UpdateDescriptor};
use shoal_proto::{ClientId, FunctionId, JobId, RejectReason, RoundId, Staleness, UpdateKind};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::error::ErrorKind;
use crate::staging::SlotPool;

const WAIT: Duration = Duration::from_secs(5);

async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (server, _) = l.accept().await.unwrap();
    (server, client)
}

fn descriptor(job: &str, seg: u32, slot: u32, generation: u32, offset: u64, length: u64) -> UpdateDescriptor {
    UpdateDescriptor {
        kind: DescriptorKind::Update,
        function: FunctionId(7),
        segment: SegmentId(seg),
        slot,
        generation,
        offset,
        length,
        job: JobId::new(job).unwrap(),
        round: RoundId(3),
        client: ClientId::new("c1").unwrap(),
        num_examples: 10,
        staleness: Staleness(0),
        update_kind: UpdateKind::Parameters,
        stream_seq: 42,
    }
}

#[tokio::test]
async fn a_host_is_welcomed_and_records_flow_both_ways() {
    let metrics = Metrics::default();
    let (mut gw, mut host) = pair().await;
    let (accepted, said) = tokio::join!(accept(&mut gw, WAIT, &metrics), hello(&mut host, FunctionId(7)));
    assert_eq!(accepted.unwrap(), FunctionId(7));
    said.unwrap();
    let d = descriptor("j", 0, 1, 2, 4096 + 64, 64);
    send_descriptor(&mut gw, &d).await.unwrap();
    let (kind, body) = read_frame(&mut host).await.unwrap();
    assert_eq!(decode_descriptor(kind, &body).unwrap(), d);
    let settles = [
        Feedback::Release { stream_seq: 42 },
        Feedback::Settle { stream_seq: 42, settle: Settle::Ack },
        Feedback::Settle { stream_seq: 42, settle: Settle::Nak(Duration::from_millis(50)) },
        Feedback::Settle {
            stream_seq: 42,
            settle: Settle::Reject(Refusal::new(RejectReason::LateUpdate, "round 3 closed")),
        },
    ];
    for f in &settles {
        match f {
            Feedback::Release { .. } => send_release(&mut host, &d).await.unwrap(),
            Feedback::Settle { stream_seq, settle } => {
                send_settle(&mut host, *stream_seq, settle).await.unwrap()
            }
        };
        let (kind, body) = read_frame(&mut gw).await.unwrap();
        assert_eq!(&decode_feedback(kind, &body).unwrap(), f);
    }
    drop(host);
    assert_eq!(read_frame(&mut gw).await.unwrap_err().kind(), ChannelErrorKind::Disconnected);
}

#[tokio::test]
async fn a_host_of_another_protocol_version_is_refused_and_told_why() {
    let metrics = Metrics::default();
    let (mut gw, mut host) = pair().await;
    let their_hello = hello_body(FunctionId(1), CHANNEL_VERSION + 1);
    let (accepted, _) =
        tokio::join!(accept(&mut gw, WAIT, &metrics), write_frame(&mut host, HELLO, &their_hello));
    let err = accepted.unwrap_err();
    assert_eq!(err.kind(), ChannelErrorKind::WrongVersion, "{err}");
    let (kind, body) = read_frame(&mut host).await.unwrap();
    assert_eq!((kind, body), (REFUSED, vec![ChannelErrorKind::WrongVersion.code()]));
    let text = metrics.encode();
    assert!(text.contains("shoal_descriptor_channel_errors_total{reason=\"wrong_version\"} 1"), "{text}");
    // And a host of this version, refused, reads the reason.
    let (mut gw, mut host) = pair().await;
    let (accepted, said) = tokio::join!(
        async {
            let _ = read_frame(&mut gw).await;
            write_frame(&mut gw, REFUSED, &[ChannelErrorKind::WrongVersion.code()]).await
        },
        hello(&mut host, FunctionId(1))
    );
    accepted.unwrap();
    assert!(matches!(said, Err(ChannelError::Refused("wrong_version"))), "{said:?}");
}

#[tokio::test]
async fn garbage_truncated_and_oversized_frames_are_typed_refusals() {
    let metrics = Metrics::default();
    // Garbage instead of a hello: an HTTP request.
    let (mut gw, mut host) = pair().await;
    host.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let err = accept(&mut gw, WAIT, &metrics).await.unwrap_err();
    assert_eq!(err.kind(), ChannelErrorKind::FrameLength, "{err}");
    // A frame cut short.
    let (mut gw, mut host) = pair().await;
    host.write_all(&100u32.to_le_bytes()).await.unwrap();
    host.write_all(&[HELLO, 1, 2]).await.unwrap();
    drop(host);
    assert_eq!(accept(&mut gw, WAIT, &metrics).await.unwrap_err().kind(), ChannelErrorKind::Truncated);
    // A silent peer.
    let (mut gw, _host) = pair().await;
    let err = accept(&mut gw, Duration::from_millis(100), &metrics).await.unwrap_err();
    assert_eq!(err.kind(), ChannelErrorKind::Truncated);
    let counted = |k: ChannelErrorKind| {
        metrics
            .descriptor_channel_errors
            .get_or_create(&crate::metrics::ReasonLabel { reason: k.as_str() })
            .get()
    };
    assert_eq!((counted(ChannelErrorKind::FrameLength), counted(ChannelErrorKind::Truncated)), (1, 2));
    // Records that do not decode, or come in the wrong direction.
    let d = descriptor("j", 0, 1, 2, 4096 + 64, 64);
    let mut cut = d.encode().to_vec();
    cut.truncate(100);
    assert_eq!(decode_descriptor(DESCRIPTOR, &cut).unwrap_err().kind(), ChannelErrorKind::Malformed);
    assert_eq!(
        decode_descriptor(DESCRIPTOR, &d.release().encode()).unwrap_err().kind(),
        ChannelErrorKind::Malformed
    );
    assert_eq!(decode_feedback(RELEASE, &d.encode()).unwrap_err().kind(), ChannelErrorKind::Malformed);
    assert_eq!(decode_feedback(SETTLE, b"\x93garbage").unwrap_err().kind(), ChannelErrorKind::Malformed);
    assert_eq!(decode_feedback(99, &[]).unwrap_err().kind(), ChannelErrorKind::Malformed);
    assert_eq!(decode_hello(DESCRIPTOR, &d.encode()).unwrap_err().kind(), ChannelErrorKind::Malformed);
}

#[tokio::test]
async fn descriptors_are_checked_against_the_read_only_segments() {
    let dir = tempfile::tempdir().unwrap();
    let pool = SlotPool::new(dir.path().to_owned(), "job".into(), 128, 1 << 20).unwrap();
    let mut slot = pool.alloc().await.unwrap();
    slot.bytes_mut()[..5].copy_from_slice(b"hello");
    let at = slot.location();
    let mut cache = SegmentCache::new(dir.path().to_owned());
    let d = descriptor("job", at.segment.0, at.index, at.generation, at.offset, at.length);
    let view = cache.view(&d).unwrap();
    assert_eq!(&view.bytes()[..5], b"hello", "the host reads the gateway's bytes in place");
    drop(view);

    let kind = |d: &UpdateDescriptor, cache: &mut SegmentCache| cache.view(d).unwrap_err().kind();
    // A slot that does not exist; an earlier lease of this slot; a length that is not the slot's.
    let far = descriptor("job", at.segment.0, 1_000_000, 1, 0, at.length);
    assert_eq!(kind(&far, &mut cache), ErrorKind::SlotOutOfRange);
    let stale = UpdateDescriptor { generation: at.generation + 1, ..d.clone() };
    assert_eq!(kind(&stale, &mut cache), ErrorKind::StaleSlot);
    let long = UpdateDescriptor { length: at.length * 2, ..d.clone() };
    assert_eq!(kind(&long, &mut cache), ErrorKind::Decode);
    // A segment that does not exist.
    let missing = UpdateDescriptor { segment: SegmentId(9), ..d.clone() };
    assert_eq!(kind(&missing, &mut cache), ErrorKind::Io);
    // A segment replaced by garbage: refused when mapped again.
    cache.forget(&d.job);
    let path = dir.path().join("job-0.seg");
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, vec![0xAB; 8192]).unwrap();
    assert_eq!(kind(&d, &mut cache), ErrorKind::Segment);
    drop(slot);
}

proptest! {
    #[test]
    fn arbitrary_frames_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = decode_hello(kind, &body);
        let _ = decode_descriptor(kind, &body);
        let _ = decode_feedback(kind, &body);
    }
}
