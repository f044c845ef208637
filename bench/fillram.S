/* bench/migrate.py's guest: a boot sector that fills the VM's RAM above 1 MiB with xorshift32
   output (incompressible: QEMU's migration sends every page), sets the byte at 0x7df4 to 1 when
   done, and halts. The end address is the u32 at offset 0x1f0, patched by the benchmark.
   Assembled with GNU as: as --32 fillram.S -o fillram.o; ld -m elf_i386 -Ttext 0x7c00
   --oformat binary fillram.o -o fillram.bin. Written for this benchmark (no third-party code). */
.code16
.globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    in $0x92, %al               /* A20 on (fast gate) */
    or $2, %al
    out %al, $0x92
    lgdt gdtdesc
    mov %cr0, %eax              /* protected mode, flat 4 GiB segments */
    or $1, %eax
    mov %eax, %cr0
    ljmp $0x08, $pm
.code32
pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x100000, %edi
    mov (0x7c00 + 0x1f0), %ecx
    mov $0x2545F491, %eax
1:  mov %eax, %edx              /* xorshift32 */
    shl $13, %edx
    xor %edx, %eax
    mov %eax, %edx
    shr $17, %edx
    xor %edx, %eax
    mov %eax, %edx
    shl $5, %edx
    xor %edx, %eax
    mov %eax, (%edi)
    add $4, %edi
    cmp %ecx, %edi
    jb 1b
    movb $1, (0x7c00 + 0x1f4)
2:  hlt
    jmp 2b
.p2align 3
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
gdtdesc:
    .word 23
    .long gdt
.org 0x1f0
    .long 0x40100000
    .long 0
.org 510
    .word 0xAA55
