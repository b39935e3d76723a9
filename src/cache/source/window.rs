//! Windows of a blob's file, and the socket that sends them without copying them.
//!
//! A reader hands hyper each chunk of a blob as [`Bytes`] over a small memory map of that
//! window of the file ([`map`]), unmapped when hyper drops it. Nothing touches the map's
//! pages on a plain connection: [`Sendfile`], the socket under hyper, finds the window a
//! write points into and sends it from the file with `sendfile(2)`, as nginx does; the page
//! cache goes to the socket without passing through this process, no page is mapped into it,
//! and its RSS stays its own memory. On any other path (TLS, which encrypts the bytes, or a
//! reader in the process) the map is read like any memory: the same bytes, mapped only while
//! the window is in flight.
//!
//! Why not copy into buffers (`pread`): one copy more per byte, and a buffer per response in
//! flight. Why not map and send the whole file: every page hyper copies into the socket stays
//! mapped, counted in RSS (64 MiB per response of a 64 MiB blob unless dropped with
//! `MADV_DONTNEED`, 3.9 GiB at 500 clients), and the copy and the page faults cost more CPU
//! than `sendfile`.
//!
//! The link from a pointer back to its file is a process-wide table of the windows alive:
//! an address inside a live map belongs to that map alone, a window is in the table only
//! while its map exists (entered after `mmap`, removed before `munmap`), and a write's
//! buffers are alive (owned by hyper) for the whole call, so the file descriptor found is
//! open, and its bytes at that offset are the buffer's bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::lock;

/// A window alive: where its map starts, in the file.
#[derive(Clone, Copy)]
struct Entry {
    len: usize,
    fd: RawFd,
    offset: u64,
}

/// The windows alive, by the address of their first byte.
static WINDOWS: Mutex<BTreeMap<usize, Entry>> = Mutex::new(BTreeMap::new());
/// How many windows are alive: a write while none is (every write of a server that only
/// answers manifests and hits in memory) looks no further, without taking the table's lock.
static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[cfg(test)]
thread_local! {
    /// Bytes sent with `sendfile` by this thread (a test's runtime): the tests cannot
    /// otherwise tell it from a copy.
    static SENT: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The owner of a window's `Bytes`: the map, and the file whose descriptor the table names.
struct Window {
    map: memmap2::Mmap,
    _file: Arc<File>,
}

impl AsRef<[u8]> for Window {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // Out of the table before the map goes (`map` drops after this body).
        lock(&WINDOWS).remove(&(self.map.as_ptr() as usize));
        LIVE.fetch_sub(1, std::sync::atomic::Ordering::Release);
    }
}

/// `len` bytes at `at` of `file`, as `Bytes` over a map of just that window. The map is not
/// populated: a page is read only if something reads the bytes in this process.
///
/// Safe because the window is inside what is on disk and stays there: a fill's temp file
/// only grows (readers map below the bytes written), and a committed blob's file is never
/// written or truncated again (replaced by a rename, evicted by an unlink, which leaves the
/// open file and its mapped pages valid).
pub(super) fn map(file: &Arc<File>, at: u64, len: usize) -> io::Result<Bytes> {
    debug_assert!(len > 0);
    // SAFETY: see above: the mapped range is never truncated or modified.
    let map = unsafe { memmap2::MmapOptions::new().offset(at).len(len).map(&**file) }?;
    let entry = Entry {
        len: map.len(),
        fd: file.as_raw_fd(),
        offset: at,
    };
    lock(&WINDOWS).insert(map.as_ptr() as usize, entry);
    // Before the window is handed to anyone: a writer that holds its bytes sees it counted.
    LIVE.fetch_add(1, std::sync::atomic::Ordering::Release);
    Ok(Bytes::from_owner(Window {
        map,
        _file: file.clone(),
    }))
}

/// The first of `bufs` that lies in a window: its index, and where its bytes are in which
/// file.
fn first_window(bufs: &[IoSlice<'_>]) -> Option<(usize, RawFd, u64)> {
    if LIVE.load(std::sync::atomic::Ordering::Acquire) == 0 {
        return None;
    }
    let windows = lock(&WINDOWS);
    if windows.is_empty() {
        return None;
    }
    bufs.iter().enumerate().find_map(|(i, buf)| {
        let at = buf.as_ptr() as usize;
        let (&start, e) = windows.range(..=at).next_back()?;
        (!buf.is_empty() && at + buf.len() <= start + e.len)
            .then(|| (i, e.fd, e.offset + (at - start) as u64))
    })
}

/// A plain TCP connection under hyper: what hyper writes from a window goes out with
/// `sendfile`, every other byte as usual.
pub struct Sendfile {
    tcp: TcpStream,
}

impl Sendfile {
    pub fn new(tcp: TcpStream) -> Sendfile {
        Sendfile { tcp }
    }

    /// Sends up to `buf.len()` bytes of `fd` at `offset` (the bytes of `buf`), as one write;
    /// copies `buf` if the file cannot be sent from (a file system without `sendfile`).
    fn poll_sendfile(
        &mut self,
        cx: &mut Context<'_>,
        fd: RawFd,
        offset: u64,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let len = buf.len();
        loop {
            ready!(self.tcp.poll_write_ready(cx))?;
            let mut sent = 0;
            let result = self.tcp.try_io(Interest::WRITABLE, || {
                let mut off = offset as libc::off_t;
                // SAFETY: both descriptors are open (the socket is ours, the file is held by
                // the window being written), and `off` is a valid out-parameter.
                let n = unsafe { libc::sendfile(self.tcp.as_raw_fd(), fd, &mut off, len) };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                sent = n as usize;
                // A short send means the socket is full. Said as `WouldBlock`, it clears the
                // readiness (as tokio does after a short write, and nginx after a short
                // sendfile): the next send waits for room, rather than asking the kernel,
                // which reads a batch of pages from the page cache before it finds no room.
                if 0 < sent && sent < len {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(sent)
            });
            match result {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && sent == 0 => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                    return Pin::new(&mut self.tcp).poll_write(cx, buf);
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
            #[cfg(test)]
            SENT.with(|s| s.set(s.get() + sent as u64));
            return Poll::Ready(Ok(sent));
        }
    }
}

impl AsyncRead for Sendfile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Sendfile {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// The buffers before the first window are written as they are; a window that comes
    /// first is sent from its file. Either is a short write, which the caller continues.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match first_window(bufs) {
            None => Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs),
            Some((0, fd, offset)) => self.poll_sendfile(cx, fd, offset, &bufs[0]),
            Some((i, ..)) => Pin::new(&mut self.tcp).poll_write_vectored(cx, &bufs[..i]),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn file_of(data: &[u8]) -> Arc<File> {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(data).unwrap();
        Arc::new(f)
    }

    /// A connected pair on loopback: the server's end wrapped.
    async fn pair() -> (Sendfile, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (Sendfile::new(accepted.unwrap().0), client.unwrap())
    }

    #[test]
    fn a_window_reads_as_the_file_and_leaves_the_table_when_dropped() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let file = file_of(&data);
        let w = map(&file, 5_000, 200_001).unwrap();
        assert_eq!(&w[..], &data[5_000..205_001]);
        let mid = w.slice(1_000..2_000);
        let found = first_window(&[IoSlice::new(b"head"), IoSlice::new(&mid)]);
        assert_eq!(found, Some((1, file.as_raw_fd(), 6_000)));
        let addr = w.as_ptr() as usize;
        drop((w, mid));
        let gone = lock(&WINDOWS).get(&addr).map(|e| e.fd);
        // Another test may have mapped the same address since; not to this file.
        assert_ne!(gone, Some(file.as_raw_fd()));
        assert_eq!(first_window(&[IoSlice::new(&data[..10])]), None);
    }

    /// Headers, a window, more plain bytes, another window: the client gets them in order,
    /// the windows sent with `sendfile`, from a file already unlinked (an evicted blob that
    /// a response still reads).
    #[tokio::test]
    async fn windows_are_sent_from_the_file_between_plain_bytes() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        std::fs::remove_file(&path).unwrap();
        let (mut server, mut client) = pair().await;
        let parts = [
            Bytes::from_static(b"HTTP/1.1 200 OK\r\n\r\n"),
            map(&file, 7, 1_500_000).unwrap(),
            Bytes::from_static(b"--boundary--"),
            map(&file, 2_999_990, 10).unwrap(),
        ];
        let expected = [
            &parts[0][..],
            &data[7..1_500_007],
            &parts[2][..],
            &data[2_999_990..],
        ]
        .concat();
        let before = SENT.with(std::cell::Cell::get);
        let reading = tokio::spawn(async move {
            let mut got = vec![0; expected.len()];
            client.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "the bytes differ");
        });
        // As hyper writes: all the parts in each vectored write, a window not first among
        // them written up to it, a window first sent alone.
        use bytes::Buf;
        let [a, b, c, d] = parts;
        let mut all = a.chain(b).chain(c).chain(d);
        server.write_all_buf(&mut all).await.unwrap();
        reading.await.unwrap();
        assert!(SENT.with(std::cell::Cell::get) - before >= 1_500_010);
    }

    /// Through hyper, as the server runs it, in HTTP/1.1 and HTTP/2: a body of windows comes
    /// out exact and goes out with `sendfile` (hyper hands the socket its buffers as they
    /// are, so the windows are found; were it to copy them, nothing would be sent so).
    #[tokio::test]
    async fn hyper_sends_a_body_of_windows_with_sendfile() {
        use http_body_util::{BodyExt, Empty};
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
        let file = file_of(&data);
        for http2 in [false, true] {
            let (server, client) = pair().await;
            let file = file.clone();
            let service = hyper::service::service_fn(move |_req| {
                let file = file.clone();
                let windows = (0..2_000_000u64)
                    .step_by(300_000)
                    .map(move |at| map(&file, at, (2_000_000 - at).min(300_000) as usize));
                let body = crate::server::body::stream(futures_util::stream::iter(windows));
                async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
            });
            let server = TokioIo::new(server);
            tokio::spawn(async move {
                let _ = match http2 {
                    false => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(server, service)
                            .await
                    }
                    true => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(server, service)
                            .await
                    }
                };
            });
            let request = || {
                http::Request::get("http://localhost/blob")
                    .body(Empty::<Bytes>::new())
                    .unwrap()
            };
            let before = SENT.with(std::cell::Cell::get);
            let client = TokioIo::new(client);
            let response = if http2 {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), client)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                send.send_request(request()).await.unwrap()
            } else {
                let (mut send, conn) = hyper::client::conn::http1::handshake(client).await.unwrap();
                tokio::spawn(conn);
                send.send_request(request()).await.unwrap()
            };
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body == data, "http2: {http2}: the bytes differ");
            assert!(
                SENT.with(std::cell::Cell::get) - before >= 1_000_000,
                "http2: {http2}: not sent with sendfile"
            );
        }
    }
}
