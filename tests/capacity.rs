//! What a Raspberry Pi must hold, checked on every target (and under
//! qemu-arm by `make cross-test`, where the address space is 32 bits):
//! thousands of parked waiters, each a thread, and bodies past 4 GiB.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;

use crate::support::*;

/// 3,000 parked consumers (each a thread with its own stack), another
/// exchange beside them, then all of them released.
#[test]
fn three_thousand_parked_consumers_leave_room_for_another_exchange() {
    const WAITERS: usize = 3000;
    let server = Server::start();
    let parked: Vec<TcpStream> = (0..WAITERS)
        .map(|i| {
            let mut stream = connect(server.addr);
            send(&mut stream, &get(&format!("/cap/{i}")));
            stream
        })
        .collect();
    server.wait_parked(WAITERS as u64);
    let addr = server.addr;
    let producer = thread::spawn(move || request(addr, &post("/other", b"still here")));
    let got = request(server.addr, &get("/other"));
    assert_eq!(got.text(), "still here");
    assert_eq!(producer.join().unwrap().status, 200);
    let deleted = request(server.addr, b"DELETE /cap HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(
        deleted.text(),
        format!("deleted {WAITERS} channels; {WAITERS} waiters answered 410\n")
    );
    for mut stream in parked {
        assert_eq!(read_response(&mut stream).unwrap().status, 410);
    }
}

/// A Content-Length past 4 GiB streams through whole: lengths from the wire
/// stay 64-bit on a 32-bit machine. The bytes are counted, never stored.
#[test]
fn a_body_over_four_gib_streams_through() {
    const BLOCK: usize = 1 << 20;
    const LENGTH: u64 = (4 << 30) + BLOCK as u64;
    let server = Server::start();
    let mut consumer = connect(server.addr);
    send(&mut consumer, &get("/huge"));
    server.wait_parked(1);
    let addr = server.addr;
    let producer = thread::spawn(move || {
        let mut stream = connect(addr);
        let head = format!("POST /huge HTTP/1.1\r\nHost: t\r\nContent-Length: {LENGTH}\r\n\r\n");
        send(&mut stream, head.as_bytes());
        let block = vec![b'x'; BLOCK];
        for _ in 0..LENGTH / BLOCK as u64 - 1 {
            stream.write_all(&block).expect("send a block");
        }
        stream
            .write_all(&[b'z'; BLOCK])
            .expect("send the last block");
        read_response(&mut stream).expect("an answer").status
    });
    let (status, headers) = read_head(&mut consumer).unwrap();
    assert_eq!(status, 200);
    let length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map(|(_, value)| value.clone());
    assert_eq!(length, Some(LENGTH.to_string()));
    let mut buf = vec![0u8; BLOCK];
    let mut received = 0u64;
    let mut tail = Vec::new();
    while received < LENGTH {
        let n = consumer.read(&mut buf).expect("read the body");
        assert!(n > 0, "body cut after {received} bytes");
        received += n as u64;
        if received > LENGTH - BLOCK as u64 {
            let from = n.saturating_sub((received - (LENGTH - BLOCK as u64)) as usize);
            tail.extend_from_slice(&buf[from..n]);
        }
    }
    assert_eq!(received, LENGTH);
    assert!(
        tail == vec![b'z'; BLOCK],
        "the last block arrived last and whole"
    );
    assert_eq!(producer.join().unwrap(), 200);
}
