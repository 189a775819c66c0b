;; Streaming (guest ABI v2, docs/GUEST-ABI.md "Streaming"). The first byte
;; of the raw body says what to do:
;;   'n', then a u32 (little-endian) count: sends that many chunks
;;        "chunk <i>\n" (i from 0 to 9, then ':' onwards), one at a time,
;;        then a tensor chunk "count" (i32 [1], the count), and returns;
;;   'w': sends "first\n", then waits, checking `cancelled`, until its
;;        client is gone; counts the cancellation in its state and returns
;;        normally, so its instance stays warm;
;;   'i': sends "first\n", then spins without calling anything: it ignores
;;        cancellation and ends at its deadline;
;;   anything else: answers its state, 8 bytes: the invocations it ran
;;        (u32) and the cancellations it saw (u32).
(module
  (import "tensor" "cancelled" (func $cancelled (result i32)))
  (import "tensor" "stream_write" (func $stream_write (param i32 i32) (result i32)))
  (import "tensor" "stream_tensor" (func $stream_tensor (param i32 i32 i32) (result i32)))
  (import "tensor" "new" (func $new (param i32 i32 i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (global $seen (mut i32) (i32.const 0))
  ;; 64: "chunk ?\n"; 80: "first\n"; 96: "count"; 112: shape [1].
  (data (i32.const 64) "chunk ?\0a")
  (data (i32.const 80) "first\0a")
  (data (i32.const 96) "count")
  (data (i32.const 112) "\01\00\00\00")
  (func (export "handle") (result i32)
    (local $n i32) (local $i i32) (local $h i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store (i32.const 0) (i32.const 0))
    (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 5)))
    (block $done
      (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 110)) ;; 'n'
        (then
          (local.set $n (i32.load (i32.const 1)))
          (block $out
            (loop $l
              (br_if $out (i32.ge_u (local.get $i) (local.get $n)))
              (i32.store8 (i32.const 70) (i32.add (i32.const 48) (i32.rem_u (local.get $i) (i32.const 75))))
              (br_if $out (i32.lt_s (call $stream_write (i32.const 64) (i32.const 8)) (i32.const 0)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br $l)))
          (i32.store (i32.const 128) (local.get $i))
          ;; i32 (code 3), shape at 112, 1 dim, data at 128, 4 bytes.
          (local.set $h (call $new (i32.const 3) (i32.const 112) (i32.const 1) (i32.const 128) (i32.const 4)))
          (drop (call $stream_tensor (i32.const 96) (i32.const 5) (local.get $h)))
          (drop (call $free (local.get $h)))
          (br $done)))
      (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 119)) ;; 'w'
        (then
          (drop (call $stream_write (i32.const 80) (i32.const 6)))
          (loop $wait
            (br_if $wait (i32.eqz (call $cancelled))))
          (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
          (br $done)))
      (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 105)) ;; 'i'
        (then
          (drop (call $stream_write (i32.const 80) (i32.const 6)))
          (loop $spin (br $spin))))
      (i32.store (i32.const 32) (global.get $calls))
      (i32.store (i32.const 36) (global.get $seen))
      (drop (call $output_write (i32.const 32) (i32.const 8))))
    (i32.const 0)))
