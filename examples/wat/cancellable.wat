;; Cancellation (guest ABI v2, docs/GUEST-ABI.md "Cancellation"): with a
;; body whose first byte is 1, it works (makes and frees tensors) until its
;; client is gone, then notes what the next op returned (-9, cancelled)
;; and counts the cancellation in its state, and returns normally, so its
;; instance stays warm. With any other body it answers that state: 8 bytes,
;; the cancellations it saw (u32) and that op's result (i32).
(module
  (import "tensor" "cancelled" (func $cancelled (result i32)))
  (import "tensor" "zeros" (func $zeros (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "input_read" (func $input_read (param i32 i32 i32) (result i32)))
  (import "tensor" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $seen (mut i32) (i32.const 0))
  (global $code (mut i32) (i32.const 0))
  (data (i32.const 16) "\01\00\00\00")
  (func (export "handle") (result i32)
    (local $h i32)
    (drop (call $input_read (i32.const 0) (i32.const 0) (i32.const 1)))
    (if (i32.eq (i32.load8_u (i32.const 0)) (i32.const 1))
      (then
        (block $out
          (loop $spin
            (br_if $out (call $cancelled))
            (local.set $h (call $zeros (i32.const 0) (i32.const 16) (i32.const 1)))
            (if (i32.gt_s (local.get $h) (i32.const 0))
              (then (drop (call $free (local.get $h)))))
            (br $spin)))
        (global.set $code (call $zeros (i32.const 0) (i32.const 16) (i32.const 1)))
        (global.set $seen (i32.add (global.get $seen) (i32.const 1)))
        (return (i32.const 0))))
    (i32.store (i32.const 32) (global.get $seen))
    (i32.store (i32.const 36) (global.get $code))
    (drop (call $output_write (i32.const 32) (i32.const 8)))
    (i32.const 0)))
