use std::net::SocketAddr;
use std::time::Instant;

use super::wire::*;
use super::*;

fn quick() -> RingConfig {
    RingConfig {
        op_timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(20),
        chunk_bytes: 64,
        ..RingConfig::default()
    }
}

/// Forms a world of `n` engines in threads of this process.
fn world(n: usize, cfg: RingConfig) -> Vec<CpuRingEngine> {
    let host = CpuRingEngine::host(n, cfg.clone()).expect("host");
    let token = host.token().to_vec();
    let peers: Vec<_> = (1..n)
        .map(|r| {
            let token = token.clone();
            let cfg = cfg.clone();
            thread::spawn(move || CpuRingEngine::connect(&token, r, n, cfg))
        })
        .collect();
    let mut out = vec![host.accept().expect("accept")];
    for p in peers {
        out.push(p.join().expect("join").expect("connect"));
    }
    out
}

/// Runs `f` on every engine in its own thread; results in rank order.
fn on_all<T: Send + 'static>(
    engines: Vec<CpuRingEngine>,
    f: impl Fn(&mut CpuRingEngine) -> T + Send + Sync + Clone + 'static,
) -> Vec<(CpuRingEngine, T)> {
    let hs: Vec<_> = engines
        .into_iter()
        .map(|mut e| {
            let f = f.clone();
            thread::spawn(move || {
                let t = f(&mut e);
                (e, t)
            })
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("join")).collect()
}

#[test]
fn token_round_trips_and_rejects_garbage() {
    let addr: SocketAddr = "127.0.0.1:4567".parse().expect("addr");
    let t = encode_token(&[7; NONCE_LEN], &addr);
    assert!(t.len() < 100);
    assert_eq!(decode_token(&t).expect("decode"), ([7; NONCE_LEN], addr));
    assert!(decode_token(b"nope").is_err());
    assert!(decode_token(&t[..t.len() - 1]).is_err());
    let mut longer = t.clone();
    longer.push(0);
    assert!(decode_token(&longer).is_err());
}

#[test]
fn segments_cover_buffer_in_order() {
    let mut v: Vec<u32> = (0..10).collect();
    let segs = split_segments(&mut v, 3, 2);
    let lens: Vec<Vec<usize>> = segs
        .iter()
        .map(|s| {
            s.iter()
                .map(|c| c.as_ref().map_or(0, |c| c.len()))
                .collect()
        })
        .collect();
    assert_eq!(lens, vec![vec![2, 1], vec![2, 1], vec![2, 2]]);
    let mut small = [1u8, 2];
    let segs = split_segments(&mut small, 3, 4);
    assert_eq!(
        segs.iter().map(|s| s.len()).collect::<Vec<_>>(),
        vec![0, 1, 1]
    );
}

#[test]
fn threads_all_reduce_and_broadcast() {
    for n in [2usize, 3] {
        let engines = world(n, quick());
        let out = on_all(engines, move |e| {
            let r = e.rank();
            let mut v: Vec<f32> = (0..37).map(|i| (i * (r + 1)) as f32).collect();
            e.all_reduce_mean(&mut v).expect("all-reduce");
            let mut b: Vec<u8> = if r == 1 {
                (0..200).map(|i| i as u8).collect()
            } else {
                vec![0; 200]
            };
            e.broadcast_bytes(&mut b, 1).expect("broadcast");
            e.barrier().expect("barrier");
            (v, b)
        });
        let ranks_sum: usize = (1..=n).sum();
        for (_, (v, b)) in &out {
            for (i, x) in v.iter().enumerate() {
                assert_eq!(*x, (i * ranks_sum) as f32 / n as f32);
            }
            assert_eq!(b, &(0..200).map(|i| i as u8).collect::<Vec<_>>());
        }
    }
}

#[test]
fn abort_unblocks_a_waiting_call() {
    let mut engines = world(2, quick());
    let e1 = engines.pop().expect("rank 1");
    let mut e0 = engines.pop().expect("rank 0");
    let h = e0.abort_handle();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        h.abort();
    });
    let start = Instant::now();
    let mut v = vec![1.0f32; 1000];
    let err = e0.all_reduce_mean(&mut v).expect_err("aborted");
    assert!(matches!(err, CollectiveError::Aborted { rank: 0 }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    t.join().expect("join");
    // The peer now fails at once instead of waiting for its timeout.
    let mut e1 = e1;
    let start = Instant::now();
    let err = e1.all_reduce_mean(&mut v).expect_err("peer gone");
    assert!(start.elapsed() < Duration::from_secs(5), "{err}");
    // And both stay poisoned.
    assert!(matches!(
        e1.barrier(),
        Err(CollectiveError::Poisoned { .. })
    ));
    assert!(matches!(e0.barrier(), Err(CollectiveError::Aborted { .. })));
}

#[test]
fn timeout_when_a_peer_never_calls() {
    let cfg = RingConfig {
        op_timeout: Duration::from_millis(300),
        ..quick()
    };
    let mut engines = world(2, cfg);
    let _idle = engines.pop();
    let mut e0 = engines.pop().expect("rank 0");
    let mut v = vec![1.0f32; 4];
    let err = e0.all_reduce_mean(&mut v).expect_err("timeout");
    assert!(
        matches!(
            err,
            CollectiveError::Timeout {
                rank: 0,
                peer: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn abort_interrupts_a_join() {
    let cfg = quick();
    // A host that never accepts: the peer waits for its answer.
    let host = CpuRingEngine::host(2, cfg.clone()).expect("host");
    let peer = CpuRingEngine::peer(1, 2, cfg).expect("peer");
    let h = peer.abort_handle();
    let token = host.token().to_vec();
    let t = thread::spawn(move || peer.join(&token));
    thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    h.abort();
    let err = t.join().expect("join").expect_err("aborted");
    assert!(matches!(err, CollectiveError::Aborted { rank: 1 }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(host);
}

#[test]
fn rendezvous_rejects_wrong_world_size() {
    let cfg = quick();
    let host = CpuRingEngine::host(2, cfg.clone()).expect("host");
    let token = host.token().to_vec();
    let peer = thread::spawn(move || CpuRingEngine::connect(&token, 1, 3, cfg));
    let err = host.accept().expect_err("refused");
    assert!(err.to_string().contains("3 ranks"), "{err}");
    let err = peer.join().expect("join").expect_err("refused");
    assert!(err.to_string().contains("rank 0 refused rank 1"), "{err}");
}
