//! hyper's timer for HTTP/1.1 servers: one tokio timer per connection, with a second of
//! slack. hyper arms a header-read deadline before every request head on a keep-alive
//! connection and drops it once the head is read, so with tokio's timer every request
//! allocated a timer, inserted it into the wheel (under its lock) and removed it again, and on
//! a shard whose other timers lie further out the insert also woke the shard's own reactor: an
//! eventfd write and an extra epoll return for about one request in four under load. Here a
//! dropped sleep leaves its tokio timer to the connection's next one, and a deadline may fire
//! up to [`SLACK`] late, so the next request's deadline usually finds it armed already.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::rt::{Sleep, Timer};

/// How late a deadline may fire.
pub const SLACK: Duration = Duration::from_secs(1);

pub(super) type TokioSleep = Pin<Box<tokio::time::Sleep>>;

/// A [`Timer`] for one connection, on tokio's clock (paused in tests like tokio's own), whose
/// deadlines fire between the time asked and [`SLACK`] after it. Make one per connection: its
/// sleeps hand their tokio timer on to the next.
#[derive(Clone, Debug, Default)]
pub struct SlackTimer {
    /// The tokio timer of the last dropped sleep, still armed.
    spare: Arc<Mutex<Option<TokioSleep>>>,
}

struct SlackSleep {
    /// `None` only while being dropped.
    sleep: Option<TokioSleep>,
    spare: Arc<Mutex<Option<TokioSleep>>>,
}

impl Future for SlackSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.sleep.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Sleep for SlackSleep {}

impl Drop for SlackSleep {
    fn drop(&mut self) {
        let sleep = self.sleep.take();
        if let Ok(mut spare) = self.spare.lock() {
            *spare = sleep;
        }
    }
}

/// Arms `sleep` for `deadline` unless it already fires within the slack after it.
pub(super) fn arm(sleep: &mut TokioSleep, deadline: Instant) {
    let fires_at = sleep.deadline().into_std();
    if !(deadline..=deadline + SLACK).contains(&fires_at) {
        sleep.as_mut().reset((deadline + SLACK).into());
    }
}

impl Timer for SlackTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.sleep_until(self.now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        let spare = self.spare.lock().ok().and_then(|mut s| s.take());
        let sleep = match spare {
            Some(mut sleep) => {
                arm(&mut sleep, deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until((deadline + SLACK).into())),
        };
        Box::pin(SlackSleep {
            sleep: Some(sleep),
            spare: self.spare.clone(),
        })
    }

    fn now(&self) -> Instant {
        tokio::time::Instant::now().into_std()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<SlackSleep>() {
            // Its tokio sleep is gone only while it is dropped.
            Some(mut s) => {
                if let Some(sleep) = s.sleep.as_mut() {
                    arm(sleep, new_deadline);
                }
            }
            None => *sleep = self.sleep_until(new_deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fires_at(sleep: &mut Pin<Box<dyn Sleep>>) -> Instant {
        let s = sleep.as_mut().downcast_mut_pin::<SlackSleep>().unwrap();
        s.get_mut().sleep.as_ref().unwrap().deadline().into_std()
    }

    /// A deadline fires no earlier than asked and at most the slack later, across restarts
    /// that keep the armed timer and restarts that move it.
    #[tokio::test(start_paused = true)]
    async fn fires_within_the_slack_of_the_last_deadline() {
        let timer = SlackTimer::default();
        let start = timer.now();
        let timeout = Duration::from_secs(10);
        let mut sleep = timer.sleep_until(start + timeout);
        assert_eq!(fires_at(&mut sleep), start + timeout + SLACK);

        // Restarted 300 ms later: the armed time is still within the slack, kept.
        tokio::time::advance(Duration::from_millis(300)).await;
        timer.reset(&mut sleep, timer.now() + timeout);
        assert_eq!(fires_at(&mut sleep), start + timeout + SLACK);

        // Restarted 1.5 s after the start: it would fire early, so it moves.
        tokio::time::advance(Duration::from_millis(1200)).await;
        let asked = timer.now() + timeout;
        timer.reset(&mut sleep, asked);
        assert_eq!(fires_at(&mut sleep), asked + SLACK);

        // An earlier deadline moves it too (else it would fire too late).
        let asked = timer.now() + Duration::from_secs(2);
        timer.reset(&mut sleep, asked);
        assert_eq!(fires_at(&mut sleep), asked + SLACK);

        // It fires no earlier than asked, and by the slack after it.
        let early = Duration::from_secs(2) - Duration::from_millis(1);
        assert!(
            tokio::time::timeout(early, &mut sleep).await.is_err(),
            "fired before its deadline"
        );
        tokio::time::timeout(SLACK + Duration::from_millis(2), &mut sleep)
            .await
            .expect("did not fire within the slack");
    }

    /// The next request's sleep takes over the dropped one's tokio timer: kept as armed when
    /// its deadline is within the slack, moved when not, and it still fires.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_sleep_hands_its_timer_to_the_next() {
        let timer = SlackTimer::default();
        let timeout = Duration::from_secs(10);
        let first_deadline = timer.now() + timeout;
        drop(timer.sleep_until(first_deadline));
        assert!(timer.spare.lock().unwrap().is_some());

        tokio::time::advance(Duration::from_millis(200)).await;
        let mut second = timer.sleep_until(timer.now() + timeout);
        assert!(
            timer.spare.lock().unwrap().is_none(),
            "the spare was not taken"
        );
        assert_eq!(fires_at(&mut second), first_deadline + SLACK);
        drop(second);

        tokio::time::advance(Duration::from_secs(3)).await;
        let asked = timer.now() + Duration::from_secs(1);
        let mut third = timer.sleep_until(asked);
        assert_eq!(fires_at(&mut third), asked + SLACK);
        tokio::time::timeout(Duration::from_secs(3), &mut third)
            .await
            .expect("the handed-over timer did not fire");
    }
}
