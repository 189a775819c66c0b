;; scale.wat: y = 2·x + 1, written against guest ABI v1 by hand.
;;
;; Input `x`: a tensor of any shape (f32, or any dtype the scalar op takes).
;; Output `y`: the same shape and dtype. On a failed import, the host's
;; `last_error` message becomes the function's error.
(module
  (import "tensor" "input" (func $input (param i32 i32) (result i32)))
  (import "tensor" "scalar" (func $scalar (param i32 i32 f32) (result i32)))
  (import "tensor" "output" (func $output (param i32 i32 i32) (result i32)))
  (import "tensor" "free" (func $free (param i32) (result i32)))
  (import "tensor" "last_error" (func $last_error (param i32 i32) (result i32)))
  (import "tensor" "set_error" (func $set_error (param i32 i32) (result i32)))

  (memory (export "memory") 1)
  (data (i32.const 0) "x")
  (data (i32.const 8) "y")
  ;; bytes 1024..2047: the error message buffer

  ;; Scalar op codes (binary ops): 0 add, 2 mul.
  (global $ADD i32 (i32.const 0))
  (global $MUL i32 (i32.const 2))

  ;; For a failed import's negative code: hands the host's `last_error`
  ;; message to `set_error` and returns the code, which `handle` returns in
  ;; turn (non-zero: the client gets `function_error` with the message).
  (func $fail (param $code i32) (result i32)
    (local $n i32)
    (local.set $n (call $last_error (i32.const 1024) (i32.const 1024)))
    (if (i32.gt_u (local.get $n) (i32.const 1024)) (then (local.set $n (i32.const 1024))))
    (drop (call $set_error (i32.const 1024) (local.get $n)))
    (local.get $code))

  (func (export "handle") (result i32)
    (local $x i32) (local $scaled i32) (local $y i32)
    (local.set $x (call $input (i32.const 0) (i32.const 1)))
    (if (i32.lt_s (local.get $x) (i32.const 0))
      (then (return (call $fail (local.get $x)))))
    (local.set $scaled (call $scalar (global.get $MUL) (local.get $x) (f32.const 2)))
    (if (i32.lt_s (local.get $scaled) (i32.const 0))
      (then (return (call $fail (local.get $scaled)))))
    (local.set $y (call $scalar (global.get $ADD) (local.get $scaled) (f32.const 1)))
    (if (i32.lt_s (local.get $y) (i32.const 0))
      (then (return (call $fail (local.get $y)))))
    (drop (call $output (i32.const 8) (i32.const 1) (local.get $y)))
    ;; The output keeps `y` alive; the intermediates can go now (the input
    ;; would be freed when `handle` returns anyway).
    (drop (call $free (local.get $scaled)))
    (drop (call $free (local.get $y)))
    (drop (call $free (local.get $x)))
    (i32.const 0)))
