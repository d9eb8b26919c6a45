//! The bounded queue from the router's side to one writer task.
//!
//! Everything runs on one thread (see the module above), so the queue is a
//! `RefCell<VecDeque>` and a stored waker: no atomics, no semaphore, no
//! linked blocks, which is what a `tokio::sync::mpsc` channel spends per
//! message to be usable across threads. The semantics are the channel's:
//! `try_send` fails when full or when the receiver is gone; `recv` yields
//! what is queued, then `None` once the sender is dropped.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};

/// Why [`Sender::try_send`] did not queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendError {
    /// The queue holds its capacity.
    Full,
    /// The receiver (the writer task) is gone.
    Closed,
}

struct Inner<T> {
    items: RefCell<VecDeque<T>>,
    capacity: usize,
    /// The receiver's waker while it waits on an empty queue.
    waker: Cell<Option<Waker>>,
    sender_gone: Cell<bool>,
    receiver_gone: Cell<bool>,
    /// The receiver took an item and has not said it is done with it.
    in_hand: Cell<bool>,
}

/// The queueing side (one per queue: not `Clone`).
pub(super) struct Sender<T>(Rc<Inner<T>>);

/// The writer's side.
pub(super) struct Receiver<T>(Rc<Inner<T>>);

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("queued", &self.0.items.borrow().len())
            .field("capacity", &self.0.capacity)
            .field("receiver_gone", &self.0.receiver_gone.get())
            .finish()
    }
}

/// A queue of at most `capacity` items (at least 1).
pub(super) fn queue<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let inner = Rc::new(Inner {
        items: RefCell::new(VecDeque::new()),
        capacity: capacity.max(1),
        waker: Cell::new(None),
        sender_gone: Cell::new(false),
        receiver_gone: Cell::new(false),
        in_hand: Cell::new(false),
    });
    (Sender(inner.clone()), Receiver(inner))
}

impl<T> Inner<T> {
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl<T> Sender<T> {
    /// Queues `item` and wakes the receiver, or says why not.
    pub(super) fn try_send(&self, item: T) -> Result<(), SendError> {
        let inner = &self.0;
        if inner.receiver_gone.get() {
            return Err(SendError::Closed);
        }
        {
            let mut items = inner.items.borrow_mut();
            if items.len() >= inner.capacity {
                return Err(SendError::Full);
            }
            items.push_back(item);
        }
        inner.wake();
        Ok(())
    }

    /// How many items are queued.
    pub(super) fn len(&self) -> usize {
        self.0.items.borrow().len()
    }

    /// Nothing is queued and the receiver holds nothing it took: what the
    /// sender would queue now would be the next thing out, so it may be
    /// handed over by other means (a direct write) without reordering.
    /// False once the receiver is gone.
    pub(super) fn is_idle(&self) -> bool {
        let inner = &self.0;
        !inner.in_hand.get() && !inner.receiver_gone.get() && inner.items.borrow().is_empty()
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.0.sender_gone.set(true);
        self.0.wake();
    }
}

impl<T> Receiver<T> {
    /// The next item; `None` once the queue is empty and the sender gone.
    /// The receiver holds it (see [`Sender::is_idle`]) until
    /// [`Receiver::done`].
    pub(super) async fn recv(&mut self) -> Option<T> {
        poll_fn(|cx| {
            let inner = &self.0;
            if let Some(item) = inner.items.borrow_mut().pop_front() {
                inner.in_hand.set(true);
                return Poll::Ready(Some(item));
            }
            if inner.sender_gone.get() {
                return Poll::Ready(None);
            }
            inner.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
        .await
    }

    /// The next item if one is queued now (held like [`Receiver::recv`]'s).
    pub(super) fn try_recv(&mut self) -> Option<T> {
        let item = self.0.items.borrow_mut().pop_front();
        if item.is_some() {
            self.0.in_hand.set(true);
        }
        item
    }

    /// The receiver is done with every item it took.
    pub(super) fn done(&mut self) {
        self.0.in_hand.set(false);
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.receiver_gone.set(true);
        // What was queued will not be written: free it now.
        self.0.items.borrow_mut().clear();
        self.0.waker.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Wake};

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_recv(rx: &mut Receiver<u32>, waker: &Waker) -> Poll<Option<u32>> {
        let mut cx = Context::from_waker(waker);
        let mut fut = std::pin::pin!(rx.recv());
        fut.as_mut().poll(&mut cx)
    }

    #[test]
    fn items_come_out_in_order_and_the_bound_holds() {
        let (tx, mut rx) = queue(2);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Ok(()));
        assert_eq!(tx.try_send(3), Err(SendError::Full));
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(tx.try_send(3), Ok(()));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(rx.try_recv(), Some(3));
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn a_waiting_receiver_is_woken_by_a_send_and_by_the_sender_leaving() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let (tx, mut rx) = queue(4);
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Pending);
        tx.try_send(7).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Ready(Some(7)));
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Pending);
        tx.try_send(8).unwrap();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Ready(Some(8)));
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Pending);
        drop(tx);
        assert_eq!(count.0.load(Ordering::SeqCst), 3);
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Ready(None));
    }

    #[test]
    fn what_was_queued_before_the_sender_left_still_comes_out() {
        let (tx, mut rx) = queue(4);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        drop(tx);
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Ready(Some(1)));
        assert_eq!(rx.try_recv(), Some(2));
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Ready(None));
    }

    #[test]
    fn sending_to_a_gone_receiver_says_closed() {
        let (tx, rx) = queue::<u32>(4);
        tx.try_send(1).unwrap();
        drop(rx);
        assert_eq!(tx.try_send(2), Err(SendError::Closed));
    }

    #[test]
    fn the_sender_sees_the_receiver_idle_only_with_nothing_queued_or_in_hand() {
        let (tx, mut rx) = queue(4);
        assert!(tx.is_idle());
        tx.try_send(1).unwrap();
        assert!(!tx.is_idle(), "an item is queued");
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        assert_eq!(poll_recv(&mut rx, &waker), Poll::Ready(Some(1)));
        assert!(!tx.is_idle(), "the receiver holds the item it took");
        rx.done();
        assert!(tx.is_idle());
        tx.try_send(2).unwrap();
        assert_eq!(rx.try_recv(), Some(2));
        assert!(!tx.is_idle(), "try_recv holds its item too");
        rx.done();
        assert!(tx.is_idle());
        drop(rx);
        assert!(!tx.is_idle(), "a gone receiver is never idle");
    }

    #[test]
    fn a_zero_capacity_is_one() {
        let (tx, mut rx) = queue(0);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Err(SendError::Full));
        assert_eq!(rx.try_recv(), Some(1));
    }
}
